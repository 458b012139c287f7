"""Compressed replacements for ``torch.nn`` layers."""

from hasslefree.nn.sparse_lowrank_linear import SparseLowRankLinear, replace_linear

__all__ = ["SparseLowRankLinear", "replace_linear"]
