"""Exports that plain transformers / peft can load without importing this package.

* :func:`export_dense` merges every compressed layer into one dense weight.
* :func:`export_peft` writes the sparse weights as an ordinary HF checkpoint and
  the low-rank terms as a LoRA adapter (``lora_B = U``, ``lora_A = Vᵀ``,
  ``lora_alpha = r`` so the scaling is exactly 1).

Both swap modules in place while saving and restore them afterwards, so a model
passed in is left as it was and no second copy of it is made.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
import torch
from torch import Tensor, nn

from hasslefree.checkpoint.files import read_checkpoint_config
from hasslefree.checkpoint.format import load_compressed
from hasslefree.checkpoint.registry import codec_for_module
from hasslefree.nn import SparseLowRankLinear, replace_linear

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_DIR", "export_dense", "export_peft", "lora_config_for"]

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
Source = str | os.PathLike[str] | nn.Module


def _resolve(directory_or_model: Source) -> tuple[nn.Module, Path | None]:
    if isinstance(directory_or_model, nn.Module):
        return directory_or_model, None
    directory = Path(directory_or_model)
    return load_compressed(directory, packed=False), directory


def _plain_linear(weight: Tensor, bias: Tensor | None, conv1d: bool = False) -> nn.Module:
    """An nn.Linear (or transformers' Conv1D, weight stored in x out) adopting the tensors."""
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            lin = Conv1D(out_f, in_f)
        lin.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        lin.bias = nn.Parameter(bias.detach() if bias is not None else weight.new_zeros(out_f),
                                requires_grad=False)
        return lin
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _conv1d_names(model: nn.Module) -> set[str]:
    """Layers that are transformers' Conv1D in the model's own architecture (GPT-2).

    Exports must write those back Conv1D-shaped (in x out), or plain ``from_pretrained``
    refuses them (or, for square ones, silently loads them transposed). The original types
    come from a weightless skeleton built from the model's config.
    """
    config = getattr(model, "config", None)
    if config is None:
        return set()
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name for name, module in skeleton.named_modules() if isinstance(module, Conv1D)}


def _compressed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n, _ in found):
            continue
        if codec_for_module(module) is not None:
            found.append((name, module))
    return found


@contextmanager
def _swapped(model: nn.Module, make: Callable[[str, nn.Module], nn.Module]) -> Iterator[list[tuple[str, nn.Module]]]:
    """Temporarily replace every compressed module by ``make(name, module)``."""
    originals = _compressed_modules(model)
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, module in originals:
            replace_linear(model, name, make(name, module))
            done.append((name, module))
        yield originals
    finally:
        for name, module in done:
            replace_linear(model, name, module)


def _merged_linear(conv1d: set[str]) -> Callable[[str, nn.Module], nn.Module]:
    def make(name: str, module: nn.Module) -> nn.Module:
        if not hasattr(module, "to_dense"):
            raise TypeError(f"{name}: {type(module).__name__} has no to_dense(); cannot export it densely")
        return _plain_linear(module.to_dense(), getattr(module, "bias", None), name in conv1d)
    return make


def _sparse_base_linear(conv1d: set[str]) -> Callable[[str, nn.Module], nn.Module]:
    def make(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, SparseLowRankLinear):
            return _plain_linear(module.sparse_weight, module.bias, name in conv1d)
        logger.info("%s: %s has no LoRA form; exporting it merged into the base", name, type(module).__name__)
        return _merged_linear(conv1d)(name, module)
    return make


def _copy_tokenizer(directory: Path | None, out_dir: Path, tokenizer: Any) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        return
    if directory is None:
        return
    for fname in read_checkpoint_config(directory).get("tokenizer_files") or []:
        src = directory / fname
        if src.is_file():
            shutil.copy2(src, out_dir / fname)


def export_dense(directory_or_model: Source, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write W_S + U Vᵀ as ordinary weights; ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    model, directory = _resolve(directory_or_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _swapped(model, _merged_linear(_conv1d_names(model))) as layers:
        model.save_pretrained(str(out_dir))
    _copy_tokenizer(directory, out_dir, tokenizer)
    logger.info("exported %d merged layers densely to %s", len(layers), out_dir)
    return out_dir


def lora_config_for(ranks: dict[str, int], base_path: str, fan_in_fan_out: bool = False) -> Any:
    """LoraConfig reproducing U Vᵀ exactly: alpha = r per layer, patterns only where ranks differ.

    ``fan_in_fan_out`` marks Conv1D targets (GPT-2), whose base weight is stored in x out.
    """
    from peft import LoraConfig

    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in ranks.items() if r != default}
    return LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
        fan_in_fan_out=fan_in_fan_out,
    )


def export_peft(directory_or_model: Source, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Sparse base as a plain HF checkpoint in ``out_dir`` plus a LoRA adapter in ``out_dir/adapter``.

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir), out_dir / "adapter")``
    then computes ``x W_Sᵀ + (x V) Uᵀ`` like the compressed model. Rank-0 layers get no adapter.
    """
    model, directory = _resolve(directory_or_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv1d = _conv1d_names(model)
    with _swapped(model, _sparse_base_linear(conv1d)) as layers:
        model.save_pretrained(str(out_dir))
    _copy_tokenizer(directory, out_dir, tokenizer)
    lora = {n: m for n, m in layers if isinstance(m, SparseLowRankLinear) and m.rank > 0}
    if not lora:
        logger.warning("no layer has a low-rank part; wrote only the sparse base to %s", out_dir)
        return out_dir
    adapter_dir = out_dir / ADAPTER_DIR
    adapter_dir.mkdir(exist_ok=True)
    config = lora_config_for({n: m.rank for n, m in lora.items()}, str(out_dir),
                             fan_in_fan_out=bool(conv1d & set(lora)))
    config.save_pretrained(str(adapter_dir))
    tensors: dict[str, Tensor] = {}
    for name, m in lora.items():
        # peft's saved-adapter naming: "base_model.model.<module>.lora_{A,B}.weight" (adapter name dropped).
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.V.detach().t().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.U.detach().contiguous().cpu()
    save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    logger.info("exported sparse base + LoRA adapter for %d layers to %s", len(lora), out_dir)
    return out_dir
