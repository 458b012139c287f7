"""Bit-level helpers of :class:`PackedSparseLowRankLinear`'s layouts: the unstructured bit mask."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def encoding() -> Any:
    """:mod:`hasslefree.checkpoint.encoding`, imported on first use.

    A module-level import would run ``hasslefree.checkpoint``'s ``__init__``, which imports
    ``hasslefree.nn`` again (nn → checkpoint → nn): a cycle whose outcome depends on which
    package is imported first. Deferring it keeps both import orders working.
    """
    from hasslefree.checkpoint import encoding as module

    return module


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
    return encoding().pack_bits(padded.reshape(-1), 1).view(rows, per_row)


def positive_zeros(t: Tensor) -> Tensor:
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype, device=t.device), t)
