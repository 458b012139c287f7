"""P2 solvers: min over rank-r M = U Vᵀ of tr((T − M) H (T − M)ᵀ) for a target T.

Each returns ``(U, V)`` with U (out x r), V (in x r), from ``(target, hessian, rank, *,
options...)``. Of the loop's ``warm`` (last factors), ``iteration`` and ``generator`` each
solver declares those it uses and gets only those (see :mod:`hasslefree.solver_calls`).
"""

from hasslefree.lowrank.adam import adam_lowrank
from hasslefree.lowrank.exact import exact_lowrank
from hasslefree.lowrank.svd import scaled_svd_lowrank, truncated_svd_lowrank

LOWRANK_SOLVERS = {
    "svd": truncated_svd_lowrank,
    "scaled-svd": scaled_svd_lowrank,
    "adam": adam_lowrank,
    "exact": exact_lowrank,
}

__all__ = ["LOWRANK_SOLVERS", "adam_lowrank", "exact_lowrank", "scaled_svd_lowrank",
           "truncated_svd_lowrank"]
