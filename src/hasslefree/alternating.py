"""Algorithm 2: alternating minimisation between a P1 (sparse) and a P2 (low-rank) solver.

One function, solver-agnostic: it warm starts each step from the last, scores every
iterate by the true objective, keeps the best (not the last) and can stop early when the
relative improvement stalls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.objective import residual_objective
from hasslefree.patterns import SparsityPattern

logger = logging.getLogger(__name__)

SparseSolver = Callable[..., torch.Tensor]
LowRankSolver = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopResult:
    sparse: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    history: list[float] = field(default_factory=list)
    best_iteration: int = 0


def alternate(
    weight: torch.Tensor,
    hessian: PreparedHessian,
    pattern: SparsityPattern,
    rank: int,
    *,
    prune: SparseSolver,
    lowrank: LowRankSolver | None,
    iterations: int,
    start: str = "sparse",
    tolerance: float = 0.0,
    patience: int = 5,
    generator: torch.Generator | None = None,
    prune_options: dict | None = None,
    lowrank_options: dict | None = None,
    warm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LoopResult:
    """Minimise tr((W − S − UVᵀ) H (W − S − UVᵀ)ᵀ), S in ``pattern``, rank(UVᵀ) ≤ ``rank``.

    ``start="sparse"`` prunes W first (the paper: U Vᵀ = 0 at first, so iteration 1 is plain
    pruning); ``start="lowrank"`` fits the low-rank part to W first (OATS's order). The
    history holds the true objective (undamped H) after every iteration; the returned
    factors are those of the best iteration.
    """
    prune_options = prune_options or {}
    lowrank_options = lowrank_options or {}
    h = hessian.raw.to(weight.dtype)
    out_features, in_features = weight.shape
    empty = (weight.new_zeros(out_features, 0), weight.new_zeros(in_features, 0))
    if rank == 0 or lowrank is None:
        sparse = prune(weight, hessian, pattern, **prune_options)
        return LoopResult(sparse, *empty, [residual_objective(weight - sparse, h)], 1)

    factors = warm
    sparse = torch.zeros_like(weight)
    best: LoopResult | None = None
    history: list[float] = []
    for iteration in range(1, iterations + 1):
        previous = sparse if iteration > 1 else None
        if start == "sparse":
            sparse = prune(weight - _product(factors, weight), hessian, pattern, previous=previous,
                           **prune_options)
        factors = lowrank(weight - sparse, hessian, rank, warm=factors, iteration=iteration,
                          generator=generator, **lowrank_options)
        if start == "lowrank":
            sparse = prune(weight - _product(factors, weight), hessian, pattern, previous=previous,
                           **prune_options)
        value = residual_objective(weight - sparse - _product(factors, weight), h)
        history.append(value)
        if best is None or value < best.history[0]:
            best = LoopResult(sparse, factors[0], factors[1], [value], iteration)
        if tolerance > 0 and len(history) > patience:
            reference = min(history[:-patience])
            if reference - min(history[-patience:]) <= tolerance * reference:
                logger.debug("stopping after %d iterations: improvement below %g", iteration, tolerance)
                break
    assert best is not None
    best.history = history
    return best


def _product(factors: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
    return factors[0] @ factors[1].mT if factors is not None else torch.zeros_like(like)
