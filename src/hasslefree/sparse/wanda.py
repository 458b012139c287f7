"""Wanda: the exact P1 minimiser when H is replaced by its diagonal.

With H = diag(h) the objective separates into Σ h_j (T_ij − S_ij)², so keeping the entries
with the largest h_j T_ij² (equivalently |T_ij| sqrt(h_j), Wanda's score) at their original
value is optimal for any pattern whose constraint is a cardinality per group.
"""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.patterns import SparsityPattern


def wanda_prune(target: torch.Tensor, hessian: PreparedHessian,
                pattern: SparsityPattern) -> torch.Tensor:
    scale = hessian.raw.diagonal().sqrt().to(target.dtype)
    return target * pattern.mask_from_scores(target.abs() * scale)
