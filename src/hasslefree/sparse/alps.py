"""ALPS: P1 by ADMM with the full Hessian, then an exact refit on the found support.

Meng et al. (2024) split W = D with D in the pattern; the W-step is a ridge solve that
uses all of H, the D-step a projection onto the pattern. The penalty ρ grows faster while
the support still changes, so the support settles, and a final PCG refit on the support
removes the bias the penalty leaves behind.
"""

from __future__ import annotations

import logging

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.patterns import SparsityPattern
from hasslefree.sparse.refit import refit_on_support

logger = logging.getLogger(__name__)


def alps_prune(
    target: torch.Tensor,
    hessian: PreparedHessian,
    pattern: SparsityPattern,
    *,
    iterations: int = 150,
    rho: float = 0.1,
    check_every: int = 3,
    refit_iterations: int = 40,
    previous: torch.Tensor | None = None,
    warm_iterations: int = 30,
    warm_rho: float = 1.0,
) -> torch.Tensor:
    """ADMM on min tr((T − W) H (T − W)ᵀ) s.t. W = D, D in ``pattern``; refit at the end.

    H is normalised by its mean diagonal so the penalty schedule is scale free. The
    eigendecomposition of H makes every ridge solve (H + ρI)⁻¹ two matrix products.
    Inside the alternating loop ``previous`` (the last sparse iterate) warm starts the
    ADMM with a larger penalty and fewer steps, since the support moves little.
    """
    dtype = hessian.damped.dtype
    goal = target.to(dtype)
    goal[:, hessian.dead] = 0
    scale = float(hessian.damped.diagonal().mean())
    h = hessian.damped / scale
    evals, evecs = hessian.eigen()  # computed once per layer, not once per alternating iteration
    evals = evals / scale
    goal_h = goal @ h
    if previous is not None:
        sparse = pattern.project(previous.to(dtype))
        iterations, rho = warm_iterations, warm_rho
    else:
        sparse = pattern.project(goal)
    dual = torch.zeros_like(goal)
    support = sparse != 0
    kept = max(1, pattern.kept_count(*goal.shape))
    for step in range(iterations):
        rhs = goal_h + rho * (sparse - dual)
        weight = ((rhs @ evecs) / (evals + rho)) @ evecs.T
        sparse = pattern.project(weight + dual)
        dual += weight - sparse
        if (step + 1) % check_every == 0:
            new_support = sparse != 0
            changed = int((new_support ^ support).sum())
            support = new_support
            if changed > 0.1 * kept:
                rho *= 1.3
            elif changed > 0.005 * kept:
                rho *= 1.2
            elif changed > 0:
                rho *= 1.1
            else:
                gap = float((weight - sparse).norm() / sparse.norm().clamp_min(1e-30))
                if gap < 1e-4:
                    break
                rho *= 1.1
    logger.debug("ALPS stopped after %d ADMM steps (rho %.3g)", step + 1, rho)
    mask = pattern.mask_from_scores(sparse.abs())
    return refit_on_support(goal, h, mask, sparse, iterations=refit_iterations).to(target.dtype)
