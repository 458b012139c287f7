"""Load compressed models: one safetensors file plus one JSON config (written by ``save.py``).

Layout of a checkpoint directory::

    model.safetensors        every tensor; compressed layers in their codec's encoding
    hasslefree_config.json   format version, run config, versions, HF config, per-layer metadata
    tokenizer files          optional, as written by ``tokenizer.save_pretrained``

Nothing is pickled, and the JSON is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hasslefree.sparse_storage import dtype_from_name
from hasslefree.checkpoint.errors import CheckpointError
from hasslefree.checkpoint.linear_codec import packed_from_encoded
from hasslefree.checkpoint.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    HeaderEntry,
    open_tensors,
    read_checkpoint_config,
    read_safetensors_header,
)
from hasslefree.checkpoint.registry import codec_for_kind
from hasslefree.nn import replace_linear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["load_compressed"]

_PACKABLE_KIND = "sparse_lowrank_linear"  # SparseLowRankLinearCodec.kind: loaded packed with packed=True

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
    from accelerate import init_empty_weights

    # parameters on the meta device: every one is loaded or swapped for a compressed module, so
    # the dense skeleton never takes memory; buffers (rotary tables) stay real
    with _skip_weight_init(), init_empty_weights(include_buffers=False):
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


def _return_freed_memory() -> None:
    """Hand the decoding temporaries back to the OS (glibc keeps freed heap memory for reuse,
    about 60 MB after loading SmolLM2, which would otherwise stay in the process's RSS)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def load_compressed(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", packed: bool = True
) -> PreTrainedModel:
    """Rebuild the saved model: HF skeleton from the JSON, compressed modules swapped in, tensors loaded.

    By default every sparse + low-rank layer is a :class:`~hasslefree.nn.PackedSparseLowRankLinear`
    built straight from its stored encoding: W_S stays packed in memory, less than the dense
    model, with the compiled CPU decode kernels (outputs match the dense-storage form up to
    float rounding). ``packed=False`` gives :class:`~hasslefree.nn.SparseLowRankLinear` (W_S in
    dense storage) for training, exports and the fastest long-sequence evaluation.
    """
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
            if packed and layer["kind"] == _PACKABLE_KIND:
                try:
                    module = packed_from_encoded(parts, layer, name=name)
                except ValueError as exc:  # the message already names the layer
                    raise CheckpointError(weights_path, str(exc)) from exc
            else:
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
    empty = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if empty is not None:
        raise CheckpointError(weights_path, f"tensor {empty!r} of the model is not in the checkpoint")
    model.to(device)
    model.eval()
    _return_freed_memory()
    logger.info("loaded %d compressed layers from %s", len(config["layers"]), directory)
    return model
