"""Low-level file handling: atomic writes, safetensors headers, the JSON config.

Every failure is re-raised as :class:`CheckpointError` naming the file, because a
bare library error ("incomplete metadata") does not say which of several files
is broken.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hasslefree.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "HeaderEntry",
    "read_safetensors_header",
    "read_checkpoint_config",
    "open_tensors",
]

FORMAT_NAME = "hasslefree-compressed"
FORMAT_VERSION = 1
CONFIG_NAME = "hasslefree_config.json"
WEIGHTS_NAME = "model.safetensors"
_REQUIRED_FIELDS = ("format", "format_version", "dtype", "hf_config", "weights", "layers")
_MAX_HEADER_BYTES = 100 * 2**20

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as described by a safetensors header."""

    dtype: torch.dtype | None
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, HeaderEntry]:
    """Parse and sanity-check a safetensors header without reading tensor data."""
    if not path.is_file():
        raise CheckpointError(path, "weights file is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(path, f"corrupted or truncated safetensors header (declares {header_len} bytes)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - header_len
        entries: dict[str, HeaderEntry] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = (int(v) for v in info["data_offsets"])
            if not 0 <= begin <= end:
                raise ValueError(f"bad data offsets for {key!r}")
            if end > data_len:
                raise CheckpointError(path, f"truncated safetensors file: tensor {key!r} ends past the file")
            entries[key] = HeaderEntry(
                SAFETENSORS_DTYPES.get(info["dtype"]), tuple(int(d) for d in info["shape"]), end - begin
            )
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"corrupted safetensors header: {exc}") from exc
    return entries


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    """Load ``hasslefree_config.json`` and check the fields every reader relies on."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(path, "config file is missing (not a hasslefree checkpoint?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"invalid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(path, "top level must be a JSON object")
    missing = [f for f in _REQUIRED_FIELDS if f not in config]
    if missing:
        raise CheckpointError(path, f"missing required field(s): {', '.join(missing)}")
    if config["format"] != FORMAT_NAME:
        raise CheckpointError(path, f"unknown format {config['format']!r} (expected {FORMAT_NAME!r})")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            path, f"unsupported format version {config['format_version']!r} (this library reads {FORMAT_VERSION})"
        )
    if not isinstance(config["layers"], list) or not isinstance(config["weights"], list):
        raise CheckpointError(path, "'layers' and 'weights' must be lists")
    for i, layer in enumerate(config["layers"]):
        for field in ("name", "kind"):
            if not isinstance(layer, dict) or field not in layer:
                raise CheckpointError(path, f"layer #{i} is missing required field {field!r}")
    for key in ("weights", "tokenizer_files"):  # file names read or copied from the folder: never a path out of it
        for name in config.get(key) or []:
            if not _plain_file_name(name):
                raise CheckpointError(path, f"{key} entry {name!r} is not a plain file name inside the checkpoint")
    return config


def _plain_file_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and Path(name).name == name and not Path(name).is_absolute())


@contextmanager
def open_tensors(path: Path, device: str | torch.device = "cpu") -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield ``get(key) -> Tensor`` over a safetensors file, with errors naming the file."""
    try:
        handle_cm = safe_open(str(path), framework="pt", device=str(device))
        handle = handle_cm.__enter__()
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot open safetensors file: {exc}") from exc

    def get(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(path, f"cannot read tensor {key!r}: {exc}") from exc

    try:
        yield get
    finally:
        handle_cm.__exit__(None, None, None)
