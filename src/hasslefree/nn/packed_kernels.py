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
  computed once per layer by the caller); x is read token-major.

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
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from hasslefree.nn.packed_intrinsics import host_has_avx2
from hasslefree.nn.packed_row_kernels import (_EXPAND_RANKS, _IDENTITY_MASKS, _SET_BITS, _SET_COUNT, _TWO_FOUR_MASKS,
                                              ROW_BLOCK, XV_PARALLEL_MACS, _bitmask_kernel,
                                              _masked_single_token_kernel, _nm_kernel, _two_four_kernel,
                                              _unstructured_kernel, _xv_kernel, _xv_serial)

__all__ = ["ROW_BLOCK", "SUPPORTED_DTYPES", "LayerArrays", "Decoder", "layer_arrays", "nm_decoder",
           "set_threads_like_torch", "unstructured_decoder"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
HAVE_AVX2 = host_has_avx2()  # the permute routes for 2:4 and bit-mask rows
Decoder = Callable[[Tensor], Tensor]  # (tokens × in) → (tokens × out) for one layer


# ----------------------------------------------------------------- torch-facing wrappers
@dataclass(frozen=True)
class LayerArrays:
    """A packed layer's buffers as numpy views (bf16 as int16 bit patterns), made once per layer
    and kept by the caller while the tensors stay unchanged: converting five tensors on every
    decode call costs more than the kernel on small layers."""

    values: np.ndarray  # N:M: out × per_row; bit mask: the nonzeros, 1-D
    codes: np.ndarray  # N:M: the position bit stream; bit mask: out × ⌈in/8⌉
    U: np.ndarray
    V: np.ndarray
    bias: np.ndarray  # empty without a bias
    offsets: np.ndarray | None = None  # bit mask: first value of every row, then the count

    @property
    def has_bias(self) -> bool:
        return self.bias.shape[0] > 0


def layer_arrays(values: Tensor, codes: Tensor, U: Tensor, V: Tensor, bias: Tensor | None,
                 offsets: Tensor | None = None) -> LayerArrays:
    Un = _np(U)
    return LayerArrays(_np(values), _np(codes), Un, _np(V), _np(bias) if bias is not None else np.zeros(0, Un.dtype),
                       None if offsets is None else _np(offsets))


_threads = threading.local()  # the torch thread count numba was last set to, per calling thread


def set_threads_like_torch() -> None:
    """Run the kernels on as many threads as torch uses (``torch.set_num_threads``), capped by
    numba's pool size (``NUMBA_NUM_THREADS``). numba's setting is per calling thread; it is
    changed only when torch's count has (asking numba costs more than a small layer's kernel)."""
    torch_threads = torch.get_num_threads()
    if getattr(_threads, "torch", None) == torch_threads:
        return
    want = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    _threads.torch = torch_threads


def _np(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor as numpy without a copy; bfloat16 as its int16 bit patterns."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy()


def _inputs(x2d: Tensor, width: int) -> np.ndarray:
    """x (tokens × in) → float32 tokens × ``width`` (≥ in), zeros past ``in``; no copy when
    x is already float32, contiguous and wide enough."""
    x = x2d.detach().to(torch.float32).contiguous().numpy()
    if width == x.shape[1]:
        return x
    wide = np.zeros((x.shape[0], width), dtype=np.float32)
    wide[:, : x.shape[1]] = x
    return wide


def _low_rank_input(x: np.ndarray, arrays: LayerArrays, in_f: int) -> np.ndarray:
    """z = x V (tokens × r, float32); serial below :data:`XV_PARALLEL_MACS` multiply-adds."""
    if arrays.V.shape[1] == 0:
        return np.zeros((x.shape[0], 0), dtype=np.float32)
    macs = x.shape[0] * in_f * arrays.V.shape[1]
    return (_xv_kernel if macs >= XV_PARALLEL_MACS else _xv_serial)(x, arrays.V, in_f)


def _output(y: np.ndarray, dtype: torch.dtype) -> Tensor:
    out = torch.from_numpy(y)
    return out if dtype == torch.float32 else out.to(dtype)


def _one_entry(kernel: Callable[..., None], before: tuple, after: tuple, out_f: int) -> Decoder:
    """A decoder that makes one compiled call, ``kernel(*before, x, *after, y)``: x and y in the
    layer dtype (bf16 as bit patterns), everything else bound here once. A decode step calls
    every layer once per token, so the Python work per call is kept to the two views."""
    def decode(x2d: Tensor) -> Tensor:
        set_threads_like_torch()
        out = torch.empty((x2d.shape[0], out_f), dtype=x2d.dtype)
        kernel(*before, _np(x2d), *after, _np(out))
        return out
    return decode


def nm_decoder(arrays: LayerArrays, n: int, m: int, bits: int, in_features: int) -> Decoder:
    """The decoder of a packed N:M layer (CPU, float32 or bfloat16 input of its dtype)."""
    a = arrays
    out_f, per_row = a.values.shape
    two_four = (n, m) == (2, 4) and in_features % 16 == 0
    if two_four and HAVE_AVX2:  # the permute path, any token count, one compiled entry
        return _one_entry(_two_four_kernel, (a.values.reshape(-1), per_row, a.codes, in_features // 8,
                                             in_features // 16), (a.U, a.V, a.bias, a.has_bias), out_f)
    groups = math.ceil(in_features / m)
    width = max(in_features, (groups - 1) * m + (1 << bits)) if groups else in_features

    def decode(x2d: Tensor) -> Tensor:
        x = _inputs(x2d, in_features if two_four else width)
        z = _low_rank_input(x, a, in_features)
        y = np.empty((x.shape[0], out_f), dtype=np.float32)
        set_threads_like_torch()
        if two_four and x.shape[0] == 1:  # the masked-expand path
            offsets = np.arange(out_f, dtype=np.int64) * per_row
            _masked_single_token_kernel(a.values.reshape(-1), offsets, a.codes, in_features // 8, _TWO_FOUR_MASKS,
                                        in_features // 16, x.reshape(-1), a.U, z, a.bias, a.has_bias, y)
        else:  # x is ``width`` wide here (for 2:4, width == in_features)
            _nm_kernel(a.values, a.codes, n, m, bits, np.ascontiguousarray(x.T), a.U, z, a.bias, a.has_bias, y)
        return _output(y, x2d.dtype)
    return decode


def unstructured_decoder(arrays: LayerArrays, in_features: int) -> Decoder:
    """The decoder of a bit-mask layer; ``arrays.offsets`` (int64, out + 1 entries) holds the
    index of every row's first value, then the number of values."""
    a = arrays
    out_f, row_bytes = a.codes.shape
    if a.offsets is None or a.offsets.shape[0] != out_f + 1:
        raise ValueError(f"offsets must hold {out_f + 1} entries")
    if HAVE_AVX2:  # the permute path, any token count, one compiled entry
        return _one_entry(_bitmask_kernel, (a.codes, a.values, a.offsets, _SET_COUNT, _SET_BITS, _EXPAND_RANKS),
                          (a.U, a.V, a.bias, a.has_bias), out_f)

    def decode(x2d: Tensor) -> Tensor:
        x = _inputs(x2d, max(in_features, row_bytes * 8))
        z = _low_rank_input(x, a, in_features)
        y = np.empty((x.shape[0], out_f), dtype=np.float32)
        set_threads_like_torch()
        if x.shape[0] == 1 and row_bytes % 2 == 0:  # the masked-expand path: two mask bytes per 16 inputs
            _masked_single_token_kernel(a.values, a.offsets, a.codes, row_bytes, _IDENTITY_MASKS, row_bytes // 2,
                                        x.reshape(-1), a.U, z, a.bias, a.has_bias, y)
        else:
            _unstructured_kernel(a.codes, a.values, a.offsets, _SET_COUNT, _SET_BITS, x, a.U, z, a.bias, a.has_bias,
                                 y)
        return _output(y, x2d.dtype)
    return decode
