"""Text generation from a dense or compressed model (transformers' ``generate`` underneath)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hasslefree.cpu_bf16 import bf16_products_in_float32_for_prompts
from hasslefree.nn import PackedSparseLowRankLinear, pack_model

logger = logging.getLogger(__name__)


def check_generate_options(prompt: str, max_new_tokens: int, sample: bool = False, temperature: float = 1.0) -> None:
    """The settings a generation needs, checked before any model is loaded (ValueError)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompt.strip():
        raise ValueError("--prompt is empty")
    if sample and not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, packed: bool = True,
                  sample: bool = False, temperature: float = 1.0, seed: int = 0) -> str:
    """The prompt and its continuation, greedy unless ``sample``; with ``packed`` every
    SparseLowRankLinear of ``model`` is first packed in place (W_S stays compact in memory)."""
    check_generate_options(prompt, max_new_tokens, sample, temperature)
    if tokenizer is None:
        raise ValueError("the model comes with no tokenizer; pass one with --tokenizer")
    if packed:
        pack_model(model)
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(device)
    if ids.numel() == 0:
        raise ValueError("--prompt encodes to no tokens")
    layers = [m for m in model.modules() if isinstance(m, PackedSparseLowRankLinear)]
    if layers:
        logger.info("%d packed layers, %.2f MiB", len(layers), sum(m.stored_bytes() for m in layers) / 2**20)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": bool(sample), "max_new_tokens": max_new_tokens,
                               "pad_token_id": 0 if pad is None else pad}
    if sample:
        torch.manual_seed(seed)
        options["temperature"] = temperature
    mask = encoded.get("attention_mask")
    with bf16_products_in_float32_for_prompts(model):  # the prompt's products; decode steps stay native
        out = model.generate(input_ids=ids, attention_mask=None if mask is None else mask.to(device), **options)
    return tokenizer.decode(out[0], skip_special_tokens=True)
