"""Closed-form P2 solvers for H = I (truncated SVD) and diagonal H (OATS, Theorem 4.1)."""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian


def split_factors(left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors U = P Σ^½, V = Q Σ^½ of the top-``rank`` part of P Σ Qᵀ.

    Balanced factors keep U and V on the same scale, which is what a later gradient
    method warm started from them wants.
    """
    root = singular[:rank].sqrt()
    return left[:, :rank] * root, right[:, :rank] * root


def truncated_svd_lowrank(target: torch.Tensor, hessian: PreparedHessian | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C_r(T): best rank-r approximation in Frobenius norm (data-free P2)."""
    left, singular, right_t = torch.linalg.svd(target, full_matrices=False)
    return split_factors(left, singular, right_t.mT, rank)


def scaled_svd_lowrank(target: torch.Tensor, hessian: PreparedHessian, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M = C_r(T D) D⁻¹ with D = sqrt(diag H): exact for diagonal H (OATS's low-rank step)."""
    scale = hessian.raw.diagonal().sqrt().to(target.dtype)
    left, singular, right_t = torch.linalg.svd(target * scale, full_matrices=False)
    u, v = split_factors(left, singular, right_t.mT, rank)
    return u, v / scale.unsqueeze(1)
