"""Compressed replacements for ``torch.nn`` layers."""

from hasslefree.nn.sparse_lowrank_linear import SparseLowRankLinear, replace_linear
from hasslefree.nn.packed_dispatch import decode_kernels
from hasslefree.nn.packed_linear import PackedSparseLowRankLinear
from hasslefree.nn.packed_model import pack_model, unpack_model

__all__ = [
    "PackedSparseLowRankLinear", "SparseLowRankLinear", "decode_kernels", "pack_model", "replace_linear",
    "unpack_model",
]
