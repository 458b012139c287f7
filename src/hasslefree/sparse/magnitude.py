"""Magnitude pruning: the exact P1 minimiser when H = I (data-free)."""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.patterns import SparsityPattern


def magnitude_prune(target: torch.Tensor, hessian: PreparedHessian | None,
                    pattern: SparsityPattern) -> torch.Tensor:
    """Keep the largest |T_ij| allowed by the pattern; ``hessian`` is ignored."""
    return pattern.project(target)
