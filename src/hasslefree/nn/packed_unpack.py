"""Compiled (numba) unpacking of packed W_S row tiles into dense tensors, for the prefill path
of :class:`~hasslefree.nn.PackedSparseLowRankLinear`: bit-exact with the torch unpack, several
times faster. Imported with the decode kernels (numba is optional; see ``packed_dispatch``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from hasslefree.nn.packed_kernels import _np, set_threads_like_torch

__all__ = ["mask_unpack_rows", "nm_unpack_rows"]


@njit(parallel=True, cache=True)
def _nm_unpack_kernel(values, indices, n, m, bits, r0, out):
    """Rows r0 … r0 + len(out) of an N:M layer written densely into ``out`` (rows × groups·m,
    the layer's dtype or its int16 bit patterns): zeros, and each kept value at its column."""
    rows, width = out.shape
    per_row = values.shape[1]
    groups = per_row // n
    code_mask = (1 << bits) - 1
    for i in prange(rows):
        o = r0 + i
        for c in range(width):
            out[i, c] = 0
        start = o * per_row * bits
        byte = start >> 3
        skip = start & 7
        buf = 0
        have = 0
        j = 0
        for g in range(groups):
            for _ in range(n):
                while have < bits:
                    buf |= (np.int64(indices[byte]) >> skip) << have
                    have += 8 - skip
                    skip = 0
                    byte += 1
                out[i, g * m + (buf & code_mask)] = values[o, j]
                buf >>= bits
                have -= bits
                j += 1


@njit(parallel=True, cache=True)
def _two_four_unpack_kernel(values, indices, r0, out):
    """:func:`_nm_unpack_kernel` for 2:4 rows whose codes start on a byte (width a multiple of
    8): one code byte holds the positions of two groups, eight output columns."""
    rows, width = out.shape
    row_bytes = width // 8
    for i in prange(rows):
        o = r0 + i
        base = o * row_bytes
        for b in range(row_bytes):
            byte = indices[base + b]
            c0 = 8 * b
            for k in range(8):
                out[i, c0 + k] = 0
            out[i, c0 + (byte & 3)] = values[o, 4 * b]
            out[i, c0 + ((byte >> 2) & 3)] = values[o, 4 * b + 1]
            out[i, c0 + 4 + ((byte >> 4) & 3)] = values[o, 4 * b + 2]
            out[i, c0 + 4 + ((byte >> 6) & 3)] = values[o, 4 * b + 3]


@njit(parallel=True, cache=True)
def _mask_unpack_kernel(mask, values, offsets, r0, out):
    """Rows r0 … r0 + len(out) of a bit-mask layer written densely into ``out`` (rows × in)."""
    rows, width = out.shape
    for i in prange(rows):
        o = r0 + i
        j = offsets[o]
        for c in range(width):
            if (mask[o, c >> 3] >> (c & 7)) & 1:
                out[i, c] = values[j]
                j += 1
            else:
                out[i, c] = 0


def nm_unpack_rows(values: Tensor, indices: Tensor, n: int, m: int, bits: int, r0: int, r1: int,
                   in_features: int) -> Tensor:
    """W_S[r0:r1] of a packed N:M layer as a dense (rows × in) tensor, bit for bit."""
    groups = math.ceil(in_features / m)
    out = torch.empty(r1 - r0, groups * m, dtype=values.dtype)
    set_threads_like_torch()
    if (n, m) == (2, 4) and in_features % 8 == 0:
        _two_four_unpack_kernel(_np(values), _np(indices), r0, _np_out(out))
    else:
        _nm_unpack_kernel(_np(values), _np(indices), n, m, bits, r0, _np_out(out))
    return out[:, :in_features]


def mask_unpack_rows(mask: Tensor, values: Tensor, offsets: Tensor, r0: int, r1: int, in_features: int) -> Tensor:
    """W_S[r0:r1] of a bit-mask layer as a dense (rows × in) tensor, bit for bit."""
    out = torch.empty(r1 - r0, in_features, dtype=values.dtype)
    set_threads_like_torch()
    _mask_unpack_kernel(_np(mask), _np(values), _np(offsets), r0, _np_out(out))
    return out


def _np_out(t: Tensor) -> np.ndarray:
    """A fresh contiguous CPU tensor as a writable numpy view (bfloat16 as int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
