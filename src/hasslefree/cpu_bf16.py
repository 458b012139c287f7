"""bfloat16 matrix products at float32 speed on CPUs without native bfloat16 arithmetic.

On x86 CPUs without AVX512-BF16 or AMX (AMD Zen 3 and older, most Intel client parts), torch's
bfloat16 GEMMs are emulated: SmolLM2's projections over a 2048-token window run 4.6–7.3× slower
than in float32 on 2 Zen 3 cores (``benchmarks/bf16_products.py``), and ``x @ V`` with a tall,
thin ``V`` falls off a cliff (30–90× slower). Compressing or evaluating a
``--dtype bfloat16`` model is then dominated by them.

:func:`bf16_products_in_float32` computes those products from the float32 images of their
bfloat16 operands (exact conversions) and rounds the result once to bfloat16: what a native
bfloat16 kernel with float32 accumulation computes, up to the order of the sums. Only
products with at least :data:`MIN_ROWS` rows are converted (prefill, calibration, evaluation);
for a few rows (decode) the conversion of the weight would cost more than it saves, and
:func:`bf16_products_in_float32_for_prompts` (generation) leaves decode steps out of the mode
altogether. Tensors on
other devices and in other dtypes pass through untouched. ``HASSLEFREE_NATIVE_BF16=1`` keeps
torch's own bf16 products everywhere (to reproduce a run on another CPU, or to time the two).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["MIN_ROWS", "NATIVE_ENV", "Float32Products", "bf16_products_in_float32", "bf16_products_in_float32_for_prompts",
           "float32_products_wanted", "native_bf16"]

NATIVE_ENV = "HASSLEFREE_NATIVE_BF16"

MIN_ROWS = 32  # rows of the left operand from which a bf16 product is computed in float32

# attention is left out: torch's fused bf16 attention is faster than the float32 one (72 vs 86 ms
# for 9 heads × 2048 positions on 2 Zen 3 cores)
_PRODUCTS = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                       torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm})


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as torch sees it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _is_cpu_bf16(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and value.device.type == "cpu"


def _rows(value: torch.Tensor) -> int:
    """Rows of the left operand: every dimension but the last."""
    return value.numel() // max(1, value.shape[-1]) if value.dim() else 1


def _upcast(value: Any) -> Any:
    return value.float() if _is_cpu_bf16(value) else value


class Float32Products(TorchFunctionMode):
    """Route large bfloat16 CPU products through float32 (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in _PRODUCTS and args and _is_cpu_bf16(args[0]) and _rows(args[0]) >= MIN_ROWS:
            return func(*tree_map(_upcast, args), **tree_map(_upcast, kwargs)).to(torch.bfloat16)
        return func(*args, **kwargs)


@contextlib.contextmanager
def bf16_products_in_float32(enabled: bool | None = None) -> Iterator[None]:
    """Within the block, large bfloat16 CPU products run in float32 (``enabled=None``: only
    where :func:`native_bf16` is false and ``HASSLEFREE_NATIVE_BF16`` is not set to 1)."""
    if enabled is None:
        enabled = float32_products_wanted()
    if not enabled:
        yield
        return
    with Float32Products():
        yield


def float32_products_wanted() -> bool:
    """Whether bf16 CPU products go through float32 here: no native bf16, and
    ``HASSLEFREE_NATIVE_BF16`` not set to 1."""
    return not native_bf16() and os.environ.get(NATIVE_ENV, "") != "1"


@contextlib.contextmanager
def bf16_products_in_float32_for_prompts(model: nn.Module, enabled: bool | None = None) -> Iterator[None]:
    """Within the block, calls of ``model`` with at least :data:`MIN_ROWS` tokens (a prompt, a
    prefill) run under :class:`Float32Products`; shorter ones (decode steps) run without it: the
    mode's Python hook on every torch call costs more there than it could gain (a packed
    SmolLM2 layer: 112 -> 150 µs per call). ``enabled`` as for :func:`bf16_products_in_float32`."""
    if not (float32_products_wanted() if enabled is None else enabled):
        yield
        return
    had_own = "forward" in model.__dict__
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        tokens = ids.shape[0] * ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 0
        if tokens < MIN_ROWS:
            return original(*args, **kwargs)
        with Float32Products():
            return original(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward
