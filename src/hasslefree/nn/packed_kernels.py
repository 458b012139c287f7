"""Compiled CPU decode kernels for :class:`~hasslefree.nn.PackedSparseLowRankLinear` (numba).

Importing this module imports numba (an optional dependency, in the ``models`` extra);
:mod:`hasslefree.nn.packed_linear` imports it lazily and falls back to its pure-torch paths
when it is missing. Use it through :meth:`PackedSparseLowRankLinear.forward_kernel` or the
layer's ``forward`` (CPU, at most ``decode_tokens`` tokens, no autograd).

For a handful of tokens (decode) the layer is memory bound: ``y = x W_Sᵀ + (x V) Uᵀ + b``
costs one pass over the packed W_S. The kernels make exactly that pass:

* **N:M** — each output row walks its kept values and, with a running bit buffer, the
  ``⌈log2 M⌉``-bit in-group positions of the checkpoint's bit stream (bit ``i`` of the stream
  is bit ``i % 8`` of byte ``i // 8``; a row's codes start at bit ``row · per_row · bits``),
  gathers ``x[t, g·M + pos]`` for every token ``t`` and accumulates. Positions are decoded in
  registers, never into a temporary.
* **unstructured** — each row walks its mask bytes; a 256-entry table gives the set bits of a
  byte, the row's first value comes from per-row offsets (the running popcount of the mask,
  computed once per layer by the caller).

* **bit-mask rows on AVX2 CPUs, 1 to ``decode_tokens`` tokens** —
  :func:`~hasslefree.nn.packed_intrinsics.bitmask_row_dot`: per mask byte, 8 values from the
  row's next kept one are moved to their lanes by one ``vpermps`` (indices: each lane's rank
  among the byte's set bits, from a table) and the unset lanes zeroed; one vector multiply-add
  with the 8 contiguous inputs.
* **one token, 2:4 (input width a multiple of 16) or a bit mask with an even number of bytes
  per row, without AVX2** — :func:`~hasslefree.nn.packed_intrinsics.masked_row_dot`: 16 inputs at a time,
  the kept values expanded over their lanes by the chunk's keep mask and one vector FMA with
  the 16 contiguous inputs (no gathers; ``vpexpand`` on AVX-512). Its 16 lanes are summed by a
  fixed tree at the end of the row.
* **2:4 (input width a multiple of 16) on AVX2 CPUs, 1 to ``decode_tokens`` tokens** —
  :func:`~hasslefree.nn.packed_intrinsics.two_four_row_dot`: per 16-input chunk the 8 kept
  values are loaded as they are and the 8 inputs they multiply are picked by two in-lane
  permutes indexed by the chunk's code bits, one vector multiply-add. For several tokens the
  row is walked once per token; its values and codes (a few KB) stay in L1, so memory still sees
  one pass over the layer.

Work is split over output rows (``prange`` over blocks of :data:`ROW_BLOCK` rows, one
scratch accumulator per block). Tokens are the innermost loop, so the packed values and
positions are read once per call whatever the number of tokens. Accumulation is float32,
in a fixed order (``fastmath=False``): every row sums its terms in four interleaved partial
sums (group or mask byte ``i`` goes to partial ``i % 4``, which breaks the add-latency
chain for a single token) combined as ``(p0 + p1) + (p2 + p3)``; results do not depend on
the thread count. The low-rank branch is fused: ``z = x V`` by a row-blocked kernel with a
fixed block size (float32), then ``Σ_k U[o, k] z[t, k]`` and the bias inside the row loop,
so a bfloat16 layer rounds once, at the output.

bfloat16: numba has no bf16 type, so bf16 tensors are passed as their int16 bit patterns
and widened in the kernel (``bits << 16`` reinterpreted as float32, exact). float32 tensors
pass as they are. Inputs are converted to float32 once per call (exact for bf16).

The kernels themselves live in :mod:`hasslefree.nn.packed_row_kernels`; this module converts
tensors and picks the route.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from hasslefree.nn.packed_intrinsics import host_has_avx2
from hasslefree.nn.packed_row_kernels import (_EXPAND_RANKS, _IDENTITY_MASKS, _SET_BITS, _SET_COUNT, _TWO_FOUR_MASKS,
                                              ROW_BLOCK, _bitmask_kernel, _masked_single_token_kernel, _nm_kernel,
                                              _two_four_kernel, _unstructured_kernel, _xv_kernel)

__all__ = ["ROW_BLOCK", "SUPPORTED_DTYPES", "nm_forward", "set_threads_like_torch", "unstructured_forward"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
HAVE_AVX2 = host_has_avx2()  # the permute routes for 2:4 and bit-mask rows


# ----------------------------------------------------------------- torch-facing wrappers
def set_threads_like_torch() -> None:
    """Run the kernels on as many threads as torch uses (``torch.set_num_threads``), capped by
    numba's pool size (``NUMBA_NUM_THREADS``). numba's setting is per calling thread."""
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)


def _np(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor as numpy without a copy; bfloat16 as its int16 bit patterns."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy()


def _prepare(x2d: Tensor, rows: int) -> np.ndarray:
    """x (tokens × in) → float32 xᵀ (rows × tokens), zero rows past ``in``."""
    tokens, in_f = x2d.shape
    xt = torch.zeros(rows, tokens, dtype=torch.float32)
    xt[:in_f] = x2d.detach().t()
    return xt.numpy()


def _common(xt: np.ndarray, in_f: int, U: Tensor, V: Tensor, bias: Tensor | None, out_f: int):
    tokens = xt.shape[1]
    Un, Vn = _np(U), _np(V)
    if V.shape[1] > 0:
        z = _xv_kernel(xt, Vn, in_f)
    else:
        z = np.zeros((tokens, 0), dtype=np.float32)
    bn = _np(bias) if bias is not None else np.zeros(0, dtype=Un.dtype)
    y = np.empty((tokens, out_f), dtype=np.float32)
    return Un, z, bn, bias is not None, y


def _output(y: np.ndarray, dtype: torch.dtype) -> Tensor:
    out = torch.from_numpy(y)
    return out if dtype == torch.float32 else out.to(dtype)


def nm_forward(x2d: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bits: int, in_features: int,
               U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens × in) → (tokens × out) for a packed N:M layer (CPU tensors, float32 or bfloat16)."""
    out_f = values.shape[0]
    groups = math.ceil(in_features / m)
    rows = max(in_features, (groups - 1) * m + (1 << bits)) if groups else in_features
    xt = _prepare(x2d, rows)
    Un, z, bn, has_bias, y = _common(xt, in_features, U, V, bias, out_f)
    set_threads_like_torch()
    two_four = (n, m) == (2, 4) and in_features % 16 == 0
    if two_four and HAVE_AVX2:  # the permute path, any token count
        x = xt[:in_features].T.copy()
        _two_four_kernel(_np(values).reshape(-1), values.shape[1], _np(indices), in_features // 8,
                         in_features // 16, x.reshape(-1), in_features, Un, z, bn, has_bias, y)
    elif two_four and x2d.shape[0] == 1:  # the masked-expand path
        per_row = values.shape[1]
        offsets = np.arange(out_f, dtype=np.int64) * per_row
        _masked_single_token_kernel(_np(values).reshape(-1), offsets, _np(indices), in_features // 8, _TWO_FOUR_MASKS,
                                    in_features // 16, xt.reshape(-1), Un, z, bn, has_bias, y)
    else:
        _nm_kernel(_np(values), _np(indices), n, m, bits, xt, Un, z, bn, has_bias, y)
    return _output(y, x2d.dtype)


def unstructured_forward(x2d: Tensor, mask: Tensor, values: Tensor, offsets: Tensor, in_features: int,
                         U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens × in) → (tokens × out) for a bit-mask layer; ``offsets`` (int64, out + 1
    entries) holds the index of every row's first value, then the number of values."""
    out_f, row_bytes = mask.shape
    if offsets.numel() != out_f + 1:
        raise ValueError(f"offsets hold {offsets.numel()} entries, expected {out_f + 1}")
    xt = _prepare(x2d, max(in_features, row_bytes * 8))
    Un, z, bn, has_bias, y = _common(xt, in_features, U, V, bias, out_f)
    set_threads_like_torch()
    if HAVE_AVX2:  # the permute path, any token count
        x = xt.T.copy()
        _bitmask_kernel(_np(mask), _np(values), _np(offsets), _SET_COUNT, _SET_BITS, _EXPAND_RANKS, x.reshape(-1),
                        x.shape[1], Un, z, bn, has_bias, y)
    elif x2d.shape[0] == 1 and row_bytes % 2 == 0:  # the masked-expand path: two mask bytes per 16 inputs
        _masked_single_token_kernel(_np(values), _np(offsets), _np(mask), row_bytes, _IDENTITY_MASKS, row_bytes // 2,
                                    xt.reshape(-1), Un, z, bn, has_bias, y)
    else:
        _unstructured_kernel(_np(mask), _np(values), _np(offsets), _SET_COUNT, _SET_BITS, xt, Un, z, bn, has_bias, y)
    return _output(y, x2d.dtype)
