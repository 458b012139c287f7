"""The numba row kernels behind :mod:`hasslefree.nn.packed_kernels` (its docstring has the
layouts, the summation order and the routes): every kernel walks blocks of :data:`ROW_BLOCK`
output rows in parallel and finishes each row with the fused low-rank term and bias."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from hasslefree.nn.packed_intrinsics import (bitmask_row_dot, expand_rank_table, mask_tables, masked_row_dot,
                                              two_four_row_dot)
from hasslefree.nn.vector_intrinsics import _f32, add_column_octet, dense_dot8

ROW_BLOCK = 8  # output rows per parallel work item
V_BLOCK = 256  # rows of V per partial sum of x V (fixed, so results do not depend on threads)
XV_PARALLEL_MACS = 1 << 18  # below this, x V runs on one thread: starting the others costs more


# ----------------------------------------------------------------- kernels
@njit(parallel=True, cache=True, fastmath=False)
def _xv_kernel(x, V, n_in):
    """z (tokens × r) = x V in float32; ``x`` float32 tokens × (≥ n_in). Rows of V are summed
    in blocks of :data:`V_BLOCK`, then the blocks in order: the same bits on any thread count."""
    tokens = x.shape[0]
    rank = V.shape[1]
    blocks = (n_in + V_BLOCK - 1) // V_BLOCK
    partial = np.zeros((blocks, tokens, rank), dtype=np.float32)
    for blk in prange(blocks):
        _xv_rows(x, V, blk * V_BLOCK, min((blk + 1) * V_BLOCK, n_in), partial[blk])
    z = np.zeros((tokens, rank), dtype=np.float32)
    for blk in range(blocks):
        for t in range(tokens):
            for k in range(rank):
                z[t, k] += partial[blk, t, k]
    return z


@njit(cache=True, fastmath=False)
def _xv_serial(x, V, n_in):
    """z = x V on one thread for small layers, summed over the rows of V in order."""
    z = np.zeros((x.shape[0], V.shape[1]), dtype=np.float32)
    _xv_rows(x, V, 0, n_in, z)
    return z


@njit(cache=True, fastmath=False, inline="always")
def _xv_rows(x, V, i0, i1, z):
    """z[t, k] += Σ_{i0 <= i < i1} x[t, i] V[i, k], each sum in the order of i: eight columns
    at a time (:func:`~hasslefree.nn.packed_intrinsics.add_column_octet`), the last rank % 8
    one by one."""
    tokens, width = x.shape
    rank = V.shape[1]
    octets = rank // 8
    flat_x = x.reshape(-1)
    flat_z = z.reshape(-1)
    for t in range(tokens):
        for kb in range(octets):
            add_column_octet(V, kb * 8, flat_x, t * width, i0, i1, flat_z, t * rank + kb * 8)
        for k in range(octets * 8, rank):
            s = z[t, k]
            for i in range(i0, i1):
                s += x[t, i] * _f32(V[i, k])
            z[t, k] = s


@njit(cache=True, fastmath=False, inline="always")
def _finish_row(acc, o, U, z, bias, has_bias, y):
    """y[:, o] = (Σ partials) + U[o] · z[t] + bias[o], in float32; the low-rank term eight
    lanes at a time (:func:`~hasslefree.nn.packed_intrinsics.dense_dot8`), the last rank % 8
    terms after it in order."""
    tokens = y.shape[0]
    rank = U.shape[1]
    octets = rank // 8
    for t in range(tokens):
        s = (acc[0, t] + acc[1, t]) + (acc[2, t] + acc[3, t])
        if rank > 0:
            low = dense_dot8(U, o * rank, z, t * rank, octets)
            for k in range(octets * 8, rank):
                low += _f32(U[o, k]) * z[t, k]
            s += low
        if has_bias:
            s += _f32(bias[o])
        y[t, o] = s


@njit(parallel=True, cache=True, fastmath=False)
def _nm_kernel(values, indices, n, m, bits, xt, U, z, bias, has_bias, y):
    """N:M rows: ``values`` (out × groups·n), ``indices`` the packed position stream, ``xt`` x
    transposed and zero-padded to ≥ (groups - 1)·m + 2**bits rows (any code stays in range)."""
    out_f, per_row = values.shape
    tokens = xt.shape[1]
    groups = per_row // n
    code_mask = (1 << bits) - 1
    row_blocks = (out_f + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(row_blocks):
        acc = np.empty((4, tokens), dtype=np.float32)
        for o in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, out_f)):
            acc[:, :] = 0.0
            start = o * per_row * bits
            byte = start >> 3
            skip = start & 7  # bits of the first byte that belong to the previous row
            buf = 0
            have = 0
            j = 0
            for g in range(groups):
                lane = g & 3
                base = g * m
                for _ in range(n):
                    while have < bits:  # refill only what the next code needs: never past the stream
                        buf |= (np.int64(indices[byte]) >> skip) << have
                        have += 8 - skip
                        skip = 0
                        byte += 1
                    col = base + (buf & code_mask)
                    buf >>= bits
                    have -= bits
                    v = _f32(values[o, j])
                    j += 1
                    for t in range(tokens):
                        acc[lane, t] += v * xt[col, t]
            _finish_row(acc, o, U, z, bias, has_bias, y)


@njit(cache=True, fastmath=False, inline="always")
def _mask_row_walk(acc, mask, values, j, o, set_count, set_bits, x):
    """acc[b % 4, t] = Σ over row ``o``'s kept weights in mask byte b of value · x[t, column],
    walking the values from index ``j`` on; ``x`` float32 tokens × (≥ 8 · mask bytes)."""
    acc[:, :] = 0.0
    for b in range(mask.shape[1]):
        byte = mask[o, b]
        lane = b & 3
        base = b * 8
        for k in range(set_count[byte]):
            col = base + set_bits[byte, k]
            v = _f32(values[j])
            j += 1
            for t in range(acc.shape[1]):
                acc[lane, t] += v * x[t, col]


@njit(parallel=True, cache=True, fastmath=False)
def _unstructured_kernel(mask, values, offsets, set_count, set_bits, x, U, z, bias, has_bias, y):
    """Bit-mask rows: ``mask`` (out × ⌈in/8⌉), ``values`` the nonzeros row-major, ``offsets`` the
    first value of every row, ``set_count``/``set_bits`` the 256-entry set-bit table, ``x``
    float32 tokens × ⌈in/8⌉·8, zero-padded."""
    out_f = mask.shape[0]
    tokens = x.shape[0]
    row_blocks = (out_f + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(row_blocks):
        acc = np.empty((4, tokens), dtype=np.float32)
        for o in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, out_f)):
            _mask_row_walk(acc, mask, values, offsets[o], o, set_count, set_bits, x)
            _finish_row(acc, o, U, z, bias, has_bias, y)


@njit(parallel=True, cache=True, fastmath=False)
def _masked_single_token_kernel(values, offsets, codes, row_bytes, table, chunks, x, U, z, bias, has_bias, y):
    """One token, rows whose keep masks come 16 inputs per two code bytes (see
    :func:`~hasslefree.nn.packed_intrinsics.masked_row_dot`): row ``o``'s values start at
    ``offsets[o]`` of the flat ``values`` and its codes at byte ``o · row_bytes``; ``x`` is
    float32, zero-padded to 16·chunks."""
    out_f = y.shape[1]
    row_blocks = (out_f + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(row_blocks):
        acc = np.zeros((4, 1), dtype=np.float32)
        for o in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, out_f)):
            acc[0, 0] = masked_row_dot(values[offsets[o]:], codes, o * row_bytes, table, chunks, x)
            _finish_row(acc, o, U, z, bias, has_bias, y)


@njit(parallel=True, cache=True, fastmath=False)
def _two_four_kernel(values, per_row, codes, row_bytes, chunks, x_in, U, V, bias, has_bias, y_out):
    """2:4 rows on AVX2 (see :func:`~hasslefree.nn.packed_intrinsics.two_four_row_dot`), the whole
    call in one compiled entry: x widened, z = x V, the rows, the output rounded. Row ``o``'s
    values start at ``o · per_row`` of the flat ``values``, its codes at byte ``o · row_bytes``;
    ``x_in`` tokens × in (16 | in), ``y_out`` tokens × out, float32 or bfloat16 bit patterns."""
    tokens, stride = x_in.shape
    out_f = y_out.shape[1]
    x = _widened(x_in, stride)
    z = _low_rank_product(x, V, stride)
    flat = _two_four_arranged(x).reshape(-1)
    y = np.empty((tokens, out_f), dtype=np.float32)
    row_blocks = (out_f + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(row_blocks):
        acc = np.zeros((4, tokens), dtype=np.float32)
        for o in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, out_f)):
            for t in range(tokens):
                acc[0, t] = two_four_row_dot(values, o * per_row, codes, o * row_bytes, chunks, flat, t * stride)
            _finish_row(acc, o, U, z, bias, has_bias, y)
    _store_output(y, y_out)


@njit(parallel=True, cache=True, fastmath=False)
def _bitmask_kernel(mask, values, offsets, set_count, set_bits, table, x_in, U, V, bias, has_bias, y_out):
    """Bit-mask rows on AVX2 (see :func:`~hasslefree.nn.packed_intrinsics.bitmask_row_dot`),
    1 to ``decode_tokens`` tokens, in one compiled entry like :func:`_two_four_kernel`; ``x_in``
    tokens × in (zero-padded here to 8 · row bytes). The last rows, whose 8-value loads would
    run past the stored values, take the scalar walk of :func:`_unstructured_kernel` instead."""
    out_f, row_bytes = mask.shape
    tokens, n_in = x_in.shape
    stride = row_bytes * 8
    x = _widened(x_in, stride)
    z = _low_rank_product(x, V, n_in)
    flat = x.reshape(-1)
    total = values.shape[0]
    y = np.empty((tokens, out_f), dtype=np.float32)
    row_blocks = (out_f + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(row_blocks):
        acc = np.zeros((4, tokens), dtype=np.float32)
        for o in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, out_f)):
            if offsets[o + 1] + 8 <= total:
                acc[:, :] = 0.0
                for t in range(tokens):
                    acc[0, t] = bitmask_row_dot(values, offsets[o], mask, o * row_bytes, row_bytes, table, flat,
                                                t * stride)
            else:
                _mask_row_walk(acc, mask, values, offsets[o], o, set_count, set_bits, x)
            _finish_row(acc, o, U, z, bias, has_bias, y)
    _store_output(y, y_out)


@njit(cache=True, fastmath=False, inline="always")
def _widened(x_in, width):
    """x_in (tokens × in, float32 or bfloat16 bits) as float32 tokens × ``width`` (≥ in), zeros
    past ``in`` (exact)."""
    tokens, n_in = x_in.shape
    x = np.zeros((tokens, width), dtype=np.float32)
    for t in range(tokens):
        for i in range(n_in):
            x[t, i] = _f32(x_in[t, i])
    return x


@njit(cache=True, fastmath=False, inline="always")
def _two_four_arranged(x):
    """x (tokens × 16·chunks) with each chunk's groups of 4 in the order 0, 2, 1, 3: what
    :func:`~hasslefree.nn.packed_intrinsics.two_four_row_dot` loads as two vectors."""
    tokens, width = x.shape
    arranged = np.empty_like(x)
    for t in range(tokens):
        for c in range(0, width, 16):
            for j in range(4):
                arranged[t, c + j] = x[t, c + j]
                arranged[t, c + 4 + j] = x[t, c + 8 + j]
                arranged[t, c + 8 + j] = x[t, c + 4 + j]
                arranged[t, c + 12 + j] = x[t, c + 12 + j]
    return arranged


@njit(cache=True, fastmath=False, inline="always")
def _low_rank_product(x, V, n_in):
    """z = x V as :func:`_xv_kernel` (parallel, blocked) or :func:`_xv_serial` (one thread,
    below :data:`XV_PARALLEL_MACS` multiply-adds) compute it: the same bits as the split calls."""
    if x.shape[0] * n_in * V.shape[1] >= XV_PARALLEL_MACS:
        return _xv_kernel(x, V, n_in)
    return _xv_serial(x, V, n_in)


def _store_output(y, y_out):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_store_output)
def _store_output_overload(y, y_out):
    """y (float32) into ``y_out``: float32 as it is, int16 as bfloat16 rounded to nearest even
    (NaN as 0x7FC0), bit for bit what ``Tensor.to(torch.bfloat16)`` gives."""
    if isinstance(y_out.dtype, types.Float):
        def copy(y, y_out):
            y_out[:, :] = y
        return copy

    def rounded(y, y_out):
        bits = y.view(np.uint32)
        for t in range(y.shape[0]):
            for o in range(y.shape[1]):
                b = np.uint32(bits[t, o])
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    y_out[t, o] = np.int16(0x7FC0)
                else:
                    r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                    y_out[t, o] = np.int16(np.int32(r) - (np.int32(r) & np.int32(0x8000)) * 2)
        return None
    return rounded


def _set_bit_table() -> tuple[np.ndarray, np.ndarray]:
    count = np.zeros(256, dtype=np.int64)
    where = np.zeros((256, 8), dtype=np.int64)
    for byte in range(256):
        cols = [j for j in range(8) if byte >> j & 1]
        count[byte] = len(cols)
        where[byte, : len(cols)] = cols
    return count, where


_SET_COUNT, _SET_BITS = _set_bit_table()
_IDENTITY_MASKS, _TWO_FOUR_MASKS = mask_tables()
_EXPAND_RANKS = expand_rank_table()
