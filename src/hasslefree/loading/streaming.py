"""Open a safetensors model without loading its decoder blocks: they stream in one at a time.

The model is built on the meta device; everything outside the blocks (embeddings, final
norm, head, rotary tables) is read now, and the pipeline asks :class:`BlockWeights` for one
block just before compressing it and drops it after the block is checkpointed. Peak memory
is then one block plus the non-block weights, whatever the depth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class BlockWeights:
    """Reads the tensors of one decoder block from the model's safetensors file(s) on demand."""

    def __init__(self, files: dict[str, Path], blocks_path: str, dtype: torch.dtype) -> None:
        self.files = files  # tensor name -> file holding it
        self.prefix = blocks_path
        self.dtype = dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"the checkpoint has no tensor {missing[0]!r}")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return out

    def load(self, index: int, block: nn.Module) -> None:
        """Replace block ``index``'s meta tensors by the stored ones."""
        keys = list(block.state_dict())
        stored = self.read([f"{self.prefix}.{index}.{key}" for key in keys])
        block.load_state_dict({key: stored[f"{self.prefix}.{index}.{key}"] for key in keys}, assign=True)

    @staticmethod
    def release(block: nn.Module) -> None:
        """Free a block's memory (it has been written to disk)."""
        block.to("meta")


def tensor_files(directory: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor (single file or sharded with an index)."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_NAME
    if not single.is_file():
        raise FileNotFoundError(f"streaming needs {SINGLE_NAME} or {INDEX_NAME} in {directory}")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def open_streaming(directory: str | Path, blocks_path: str | None = None,
                   dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, BlockWeights]:
    """``(model, weights)``: the model with every decoder block left on the meta device.

    ``blocks_path`` (default: the architecture registry's, e.g. ``model.layers`` for Llama,
    ``transformer.h`` for GPT-2) names the block list. Fails with a ValueError before reading
    any block when the folder is not a safetensors checkpoint, the blocks cannot be found, or
    a block holds buffers that are not stored in it (they could not be restored per block).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model folder (no config.json)")
    files = tensor_files(directory)
    config = AutoConfig.from_pretrained(str(directory))
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if blocks_path is None:
        from hasslefree.architectures import resolve_architecture

        blocks_path = resolve_architecture(model).blocks
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no block list at {blocks_path!r}") from None
    for index, block in enumerate(blocks):
        absent = [f"{blocks_path}.{index}.{key}" for key in block.state_dict()
                  if f"{blocks_path}.{index}.{key}" not in files]
        if absent:
            raise ValueError(f"the checkpoint in {directory} has no tensor {absent[0]!r}")
        volatile = set(dict(block.named_buffers())) - set(block.state_dict())
        if volatile:
            raise ValueError(f"block {index} has buffers not stored in the checkpoint ({sorted(volatile)[0]}); "
                             "load the model without streaming")
    _load_outside_blocks(model, blocks_path, files, dtype)
    return model, BlockWeights(files, blocks_path, dtype)


def _load_outside_blocks(model: PreTrainedModel, blocks_path: str, files: dict[str, Path],
                         dtype: torch.dtype) -> None:
    """Materialise every tensor outside the blocks; rebuild buffers the file does not hold."""
    prefix = blocks_path + "."
    state_keys = [k for k in model.state_dict() if not k.startswith(prefix)]
    tied = _tied_names(model)
    wanted = [k for k in state_keys if k in files or k not in tied]
    weights = BlockWeights(files, blocks_path, dtype).read(wanted)
    model.load_state_dict(weights, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(prefix):
            continue
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module._buffers[buffer_name] = _fresh_buffer(model, module, name, buffer_name)
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if left:
        raise ValueError(f"the checkpoint does not hold {left[0]!r}")


def _tied_names(model: PreTrainedModel) -> set[str]:
    """Parameter names that tie_weights fills (an untied file still stores them)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is output}


def _fresh_buffer(model: PreTrainedModel, module: nn.Module, name: str, buffer_name: str) -> torch.Tensor:
    """Non-persistent buffers (rotary inverse frequencies) come from building the module again."""
    try:
        fresh = type(module)(config=model.config)
    except TypeError as exc:
        raise ValueError(f"cannot rebuild buffer {name}.{buffer_name} outside the checkpoint ({exc}); "
                         "load the model without streaming") from None
    return getattr(fresh, buffer_name)
