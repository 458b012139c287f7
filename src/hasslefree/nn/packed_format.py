"""Bit-level helpers of :class:`PackedSparseLowRankLinear`'s layouts: the unstructured bit mask,
the N:M positions read tile by tile, and the checks of both."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from hasslefree import sparse_storage


def popcount_u8(x: Tensor) -> Tensor:
    """Set bits of every byte (uint8 in, uint8 out), without a lookup table."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def unpack_mask(mask: Tensor, in_features: int) -> Tensor:
    """(rows, ⌈in/8⌉) uint8 → (rows, in) bool, bit j of byte b being column 8b + j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.view(mask.shape[0], -1)[:, :in_features].bool()


def pack_mask(keep: Tensor) -> Tensor:
    """(rows, in) bool → (rows, ⌈in/8⌉) uint8; inverse of :func:`unpack_mask`."""
    rows, in_f = keep.shape
    per_row = math.ceil(in_f / 8)
    padded = F.pad(keep.to(torch.uint8), (0, per_row * 8 - in_f))
    return sparse_storage.pack_bits(padded.reshape(-1), 1).view(rows, per_row)


def positive_zeros(t: Tensor) -> Tensor:
    """``t`` with every -0.0 made +0.0; ``t`` itself (no copy) when it holds none, so a
    memory-mapped checkpoint's values stay a view of the file."""
    if not t.is_floating_point() or not bool(((t == 0) & torch.signbit(t)).any()):
        return t
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype, device=t.device), t)


def nm_positions(indices: Tensor, out_f: int, in_f: int, n: int, m: int, bits: int, tile: int,
                 device: torch.device) -> Iterator[tuple[int, int, Tensor]]:
    """Yield (r0, r1, in-group positions (rows × groups × N) int64) for every row tile of an
    N:M layer's bit-packed ``indices`` (``tile`` a multiple of 8, so tiles start on a byte)."""
    groups = math.ceil(in_f / m)
    per_row = groups * n
    for r0 in range(0, out_f, tile):
        r1 = min(r0 + tile, out_f)
        b0 = r0 * per_row * bits // 8  # exact: r0 is a multiple of 8
        b1 = math.ceil(r1 * per_row * bits / 8)
        pos = sparse_storage.unpack_bits(indices[b0:b1], bits, (r1 - r0) * per_row)
        yield r0, r1, pos.to(device).view(r1 - r0, groups, n)


def check_nm_layout(values: Tensor, indices: Tensor, out_f: int, in_f: int, n: int, m: int, bits: int, tile: int,
                    pattern: str) -> None:
    """Positions in range and strictly increasing per group; padding columns hold zeros."""
    groups = math.ceil(in_f / m)
    total_bits = out_f * groups * n * bits
    if total_bits % 8 and bool(indices[-1] >> (total_bits % 8)):
        raise ValueError("indices have bits set past the last position")
    tail = in_f - (groups - 1) * m  # real columns in the last group
    for r0, r1, pos in nm_positions(indices, out_f, in_f, n, m, bits, tile, values.device):
        if pos.numel() == 0:
            continue
        if int(pos.max()) >= m:
            raise ValueError(f"{pattern} indices out of range (a position >= {m}) in rows {r0}..{r1 - 1}")
        if n > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()):
            raise ValueError(f"{pattern} indices not strictly increasing within a group in rows {r0}..{r1 - 1}")
        if tail < m:
            padded = pos[:, -1, :] >= tail
            if bool((values[r0:r1, -n:][padded] != 0).any()):
                raise ValueError(f"a nonzero value sits in the zero padding past column {in_f} "
                                 f"in rows {r0}..{r1 - 1}")
