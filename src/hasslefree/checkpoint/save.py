"""Write compressed models in the checkpoint format (see :mod:`hasslefree.checkpoint.format`).

Tensors go to disk one at a time through :class:`IncrementalSafetensors`; a model whose
decoder blocks are streamed (not in memory) is written one block at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hasslefree.sparse_storage import dtype_name
from hasslefree.atomic_files import write_json_atomic
from hasslefree.checkpoint.files import CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_NAME
from hasslefree.checkpoint.incremental import IncrementalSafetensors
from hasslefree.checkpoint.registry import codec_for_module

logger = logging.getLogger(__name__)

__all__ = ["BlockStream", "save_compressed", "library_versions"]


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint, for reproducibility."""
    import transformers

    from hasslefree.version import __version__ as ours

    try:
        st = metadata.version("safetensors")
    except metadata.PackageNotFoundError:
        st = "unknown"
    return {"hasslefree": ours, "torch": torch.__version__, "transformers": transformers.__version__, "safetensors": st}


class BlockStream(Protocol):
    """Where a streamed model's blocks are: ``path`` in the model, and how to fetch/drop one."""

    path: str

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, block: nn.Module) -> None: ...


def _write_tree(writer: IncrementalSafetensors, root: nn.Module, prefix: str, layers: list[dict[str, Any]],
                aliases: dict[str, str]) -> None:
    """Write ``root``'s tensors under ``prefix``: compressed layers by their codec, the rest as is
    (a tensor sharing storage with one already written, such as tied embeddings, becomes an alias)."""
    compressed: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in compressed):
            continue
        codec = codec_for_module(module)
        if codec is None:
            continue
        if not name and not prefix:
            raise ValueError("the root module itself cannot be a compressed layer")
        full = prefix + name
        encoded, meta = codec.encode(module)
        stored = sum(writer.add(f"{full}.{rel}", t) for rel, t in encoded.items())
        layers.append({"name": full, "kind": codec.kind, **meta, "stored_bytes": stored})
        compressed.append(name + ".")
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in root.state_dict().items():
        if any(key.startswith(p) for p in compressed):
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in seen:
            aliases[prefix + key] = seen[ident]
            continue
        seen[ident] = prefix + key
        writer.add(prefix + key, t)


@contextlib.contextmanager
def _blocks_detached(model: nn.Module, path: str) -> Iterator[nn.ModuleList]:
    """The model without its block list for the duration (so its tensors are not visited)."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList()
    try:
        yield blocks
    finally:
        parent._modules[attr] = blocks


def _volatile_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Dtypes of non-persistent buffers (e.g. RoPE ``inv_freq``): not saved, but a model cast
    with ``.to(dtype)`` carries them in that dtype, and outputs depend on it."""
    persistent = set(model.state_dict())
    return {n: dtype_name(b.dtype) for n, b in model.named_buffers() if n not in persistent}


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def _save_tokenizer(tokenizer: Any, directory: Path) -> list[str]:
    """Save into a temp folder first, then move the files in, so readers never see half a tokenizer."""
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(str(staging))
        names = sorted(p.name for p in staging.iterdir())
        for name in names:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_compressed(
    model: nn.Module, directory: str | os.PathLike[str], run_config: dict[str, Any] | None = None, tokenizer: Any = None,
    *, blocks: BlockStream | None = None,
) -> Path:
    """Write ``model`` (an HF causal LM with compressed layers) to ``directory``; return the path.

    Tensors go to disk one at a time. With ``blocks`` the decoder blocks are not in memory:
    each is fetched, written and dropped in turn, so memory holds one block.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        raise TypeError("save_compressed needs a transformers PreTrainedModel (with .config)")

    layers: list[dict[str, Any]] = []
    aliases: dict[str, str] = {}
    weights_path = directory / WEIGHTS_NAME
    with IncrementalSafetensors(weights_path, {"format": "pt", "hasslefree_format_version": str(FORMAT_VERSION)}) as out:
        if blocks is None:
            _write_tree(out, model, "", layers, aliases)
        else:
            with _blocks_detached(model, blocks.path) as block_list:
                _write_tree(out, model, "", layers, aliases)
            for index, block in enumerate(block_list):
                blocks.load(index, block)
                _write_tree(out, block, f"{blocks.path}.{index}.", layers, aliases)
                blocks.release(block)
    if not layers:
        logger.warning("saving a model with no compressed layers to %s", directory)
    run = dict(run_config or {})
    patterns = sorted({layer.get("pattern", "?") for layer in layers})
    tokenizer_files = _save_tokenizer(tokenizer, directory) if tokenizer is not None else []
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": run.get("method"),
        "pattern": run.get("pattern", patterns[0] if len(patterns) == 1 else patterns),
        "rank_policy": run.get("rank_policy", run.get("rank")),
        "run_config": run,
        "versions": library_versions(),
        "dtype": dtype_name(_model_dtype(model)),
        "hf_config": json.loads(hf_config.to_json_string(use_diff=False)),
        "weights": [WEIGHTS_NAME],
        "aliases": aliases,
        "buffer_dtypes": _volatile_buffer_dtypes(model),
        "tokenizer_files": tokenizer_files,
        "totals": {
            "compressed_layers": len(layers),
            "compressed_stored_bytes": sum(layer["stored_bytes"] for layer in layers),
            "file_bytes": weights_path.stat().st_size,
        },
        "layers": layers,
    }
    write_json_atomic(directory / CONFIG_NAME, config)
    logger.info("saved %d compressed layers to %s (%.1f MB)", len(layers), directory, weights_path.stat().st_size / 1e6)
    return directory
