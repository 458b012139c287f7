"""Sparse + hierarchical (HSS) low-rank compression of linear layers.

``W_hat = S + P_r^T A P_c``: S holds the largest-magnitude weights, A is a hierarchical
matrix (dense diagonal leaves, low-rank off-diagonal blocks whose rank shrinks with depth)
fitted to the permuted residual, optionally on the layer objective tr(E H E^T).
"""

from .budget import RankRule, hss_parameter_count, outer_rank_for_budget, sparse_count, total_parameter_count
from .construct import VARIANTS, HSSDecomposition, decompose, magnitude_sparse, pattern_bandwidth, rcm_permutation
from .fit import damp_hessian, fit_hss, layer_objective
from .layer import HSSLinear, compress_linear_hss
from .matrix import HSSMatrix, hss_partition
from .options import HSS_METHODS, HSSOptions, is_hss_method
from . import codec as _codec  # noqa: E402,F401  (registers HSSLinear with the checkpoint format)

__all__ = [
    "RankRule",
    "hss_parameter_count",
    "outer_rank_for_budget",
    "sparse_count",
    "total_parameter_count",
    "VARIANTS",
    "HSSDecomposition",
    "decompose",
    "magnitude_sparse",
    "pattern_bandwidth",
    "rcm_permutation",
    "damp_hessian",
    "fit_hss",
    "layer_objective",
    "HSSLinear",
    "compress_linear_hss",
    "HSSMatrix",
    "hss_partition",
    "HSS_METHODS",
    "HSSOptions",
    "is_hss_method",
]
