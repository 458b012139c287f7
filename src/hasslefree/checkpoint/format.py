"""Save and load compressed models: one safetensors file plus one JSON config.

Layout of a checkpoint directory::

    model.safetensors        every tensor; compressed layers in their codec's encoding
    hasslefree_config.json   format version, run config, versions, HF config, per-layer metadata
    tokenizer files          optional, as written by ``tokenizer.save_pretrained``

Nothing is pickled, and the JSON is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from hasslefree.checkpoint.encoding import dtype_from_name, dtype_name
from hasslefree.checkpoint.errors import CheckpointError
from hasslefree.checkpoint.files import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    HeaderEntry,
    open_tensors,
    read_checkpoint_config,
    read_safetensors_header,
    write_json_atomic,
)
from hasslefree.checkpoint.incremental import IncrementalSafetensors
from hasslefree.checkpoint.registry import codec_for_kind, codec_for_module
from hasslefree.nn import replace_linear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["save_compressed", "load_compressed", "library_versions"]


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint, for reproducibility."""
    import transformers

    try:
        import hasslefree

        ours = getattr(hasslefree, "__version__", None) or metadata.version("hasslefree")
    except (ImportError, metadata.PackageNotFoundError):
        ours = "unknown"
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


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    for name, dtype_str in dtypes.items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue
        buf = parent._buffers.get(leaf)
        dtype = dtype_from_name(dtype_str)
        if buf is not None and buf.dtype != dtype:
            parent._buffers[leaf] = buf.to(dtype)


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
    write_json_atomic(config, directory / CONFIG_NAME)
    logger.info("saved %d compressed layers to %s (%.1f MB)", len(layers), directory, weights_path.stat().st_size / 1e6)
    return directory


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip random initialisation (all weights get loaded anyway); harmless if unavailable."""
    ctx: Any = None
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            ctx = importlib.import_module(mod).no_init_weights
            break
        except (ImportError, AttributeError):
            continue
    with ctx() if ctx is not None else contextlib.nullcontext():
        yield


def _build_model(config: dict[str, Any], config_path: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(config["hf_config"])
    try:
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(config_path, f"cannot rebuild the transformers config: {exc}") from exc
    dtype = dtype_from_name(config["dtype"])
    with _skip_weight_init():
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _check_entry(
    path: Path, key: str, entry: HeaderEntry | None, shape: tuple[int, ...], dtype: torch.dtype | None
) -> None:
    """Compare a header entry with what the config implies (dtype None: any dtype is fine)."""
    if entry is None:
        raise CheckpointError(path, f"tensor {key!r} is missing")
    if entry.shape != tuple(shape):
        raise CheckpointError(path, f"tensor {key!r} has shape {list(entry.shape)}, config expects {list(shape)}")
    if dtype is not None and entry.dtype != dtype:
        raise CheckpointError(path, f"tensor {key!r} has dtype {entry.dtype}, config expects {dtype}")


def load_compressed(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> PreTrainedModel:
    """Rebuild the saved model: HF skeleton from the JSON, compressed modules swapped in, tensors loaded."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    config_path = directory / CONFIG_NAME
    if config["weights"] != [WEIGHTS_NAME]:
        raise CheckpointError(config_path, f"unsupported weights list {config['weights']!r}")
    weights_path = directory / WEIGHTS_NAME
    header = read_safetensors_header(weights_path)
    model = _build_model(config, config_path)
    used: set[str] = set()
    prefixes: list[str] = []
    with open_tensors(weights_path, "cpu") as get:
        for layer in config["layers"]:
            name = layer["name"]
            try:
                codec = codec_for_kind(layer["kind"])
                specs = codec.tensor_specs(layer)
            except KeyError as exc:
                raise CheckpointError(config_path, f"layer {name!r}: missing field or unknown kind: {exc}") from exc
            except ValueError as exc:
                raise CheckpointError(config_path, f"layer {name!r}: {exc}") from exc
            parts = {}
            for rel, (shape, dtype) in specs.items():
                key = f"{name}.{rel}"
                want = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
                _check_entry(weights_path, key, header.get(key), tuple(shape), want)
                parts[rel] = get(key)
                used.add(key)
            try:
                old = model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(config_path, f"layer {name!r} does not exist in the rebuilt model") from exc
            expect = (getattr(old, "out_features", None), getattr(old, "in_features", None))
            if expect != (None, None) and expect != (layer.get("out_features"), layer.get("in_features")):
                raise CheckpointError(
                    config_path,
                    f"layer {name!r} is {layer.get('out_features')}x"
                    f"{layer.get('in_features')} but the model config says {expect[0]}x{expect[1]}",
                )
            try:
                module = codec.decode(parts, layer)
            except ValueError as exc:
                raise CheckpointError(weights_path, f"layer {name!r}: {exc}") from exc
            replace_linear(model, name, module)
            prefixes.append(name + ".")
        aliases: dict[str, str] = dict(config.get("aliases") or {})
        state: dict[str, torch.Tensor] = {}
        for key, t in model.state_dict().items():
            if key in aliases or any(key.startswith(p) for p in prefixes):
                continue
            _check_entry(weights_path, key, header.get(key), tuple(t.shape), None)
            state[key] = get(key)
            used.add(key)
        for alias, target in aliases.items():
            if target not in state:
                raise CheckpointError(config_path, f"alias {alias!r} points to unknown tensor {target!r}")
            state[alias] = state[target]
    unexpected = sorted(set(header) - used)
    if unexpected:
        raise CheckpointError(weights_path, f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    # assign=True keeps each stored dtype (e.g. a norm kept in float32); ties are re-made after.
    model.load_state_dict(state, strict=False, assign=True)
    if aliases and hasattr(model, "tie_weights"):
        model.tie_weights()
    _restore_buffer_dtypes(model, dict(config.get("buffer_dtypes") or {}))
    model.to(device)
    model.eval()
    logger.info("loaded %d compressed layers from %s", len(config["layers"]), directory)
    return model
