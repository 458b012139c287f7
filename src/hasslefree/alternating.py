"""Algorithm 2: alternating minimisation between a P1 (sparse) and a P2 (low-rank) solver.

Solver-agnostic: it warm starts each step from the last, scores every iterate by the true
objective, keeps the best (not the last) and can stop early when the relative improvement
stalls. Layers that share an input (q/k/v, gate/up) can run in lockstep: when the P1 solver
is row-separable for the pattern (SparseGPT, Wanda, magnitude with N:M or per-row budgets),
their targets are stacked row-wise into one P1 call per iteration, which gives the same
result as separate calls with a fraction of the per-column overhead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.objective import residual_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.solver_calls import loop_keywords
from hasslefree.stage_clock import timed
from hasslefree.sparse.refit import coefficients_for_basis, refit_on_support

logger = logging.getLogger(__name__)

DEFAULT_PROBE = 5  # iterations of each order that start="auto" runs before choosing

SparseSolver = Callable[..., torch.Tensor]
LowRankSolver = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopResult:
    sparse: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    history: list[float] = field(default_factory=list)
    best_iteration: int = 0
    timeline: list[float] = field(default_factory=list)


def alternate_many(
    weights: list[torch.Tensor],
    hessian: PreparedHessian,
    pattern: SparsityPattern,
    ranks: list[int],
    *,
    prune: SparseSolver,
    lowrank: LowRankSolver | None,
    iterations: int,
    start: str = "sparse",
    tolerance: float = 0.0,
    patience: int = 5,
    generators: list[torch.Generator | None] | None = None,
    prune_options: dict | None = None,
    lowrank_options: dict | None = None,
    warm: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    stack: bool = False,
    clock: dict[str, float] | None = None,
    refresh_every: int = 1,
    refine_iterations: int = 6,
) -> list[LoopResult]:
    """Minimise tr((W − S − UVᵀ) H (W − S − UVᵀ)ᵀ), S in ``pattern``, rank(UVᵀ) ≤ r, per layer.

    ``start="sparse"`` prunes W first (the paper: U Vᵀ = 0 at first, so iteration 1 is plain
    pruning); ``start="lowrank"`` fits the low-rank part to W first (OATS's order). Each
    history holds the true objective (undamped H) after every iteration; the returned
    factors are those of the best iteration. Several layers with one Hessian run in lockstep.

    With ``stack`` the P1 targets of the still-active layers are concatenated row-wise into
    one solver call (only valid for row-separable solvers and patterns); each layer keeps its
    own P2, objective history, best iterate and early stop. ``clock`` (if given) accumulates
    the seconds spent in P1, P2 and the objective under the keys "P1", "P2", "objective".

    With ``refresh_every`` = k > 1 the P1 solver runs on iterations 1, k + 1, 2k + 1, ...;
    in between, P1 keeps the last support and re-solves its weights jointly with U for the
    current V (``refine_iterations`` PCG steps, U eliminated). Once the support settles this
    costs less than a pruning pass and removes the slow zig-zag between S and U.
    """
    if refresh_every < 1 or refine_iterations < 1:
        raise ValueError(f"refresh_every and refine_iterations must be >= 1, got {refresh_every} "
                         f"and {refine_iterations}")
    prune_options = prune_options or {}
    lowrank_options = lowrank_options or {}
    generators = generators or [None] * len(weights)
    h = hessian.raw.to(weights[0].dtype)
    if lowrank is None or all(r == 0 for r in ranks):
        with timed(clock, "P1"):
            sparse = _prune_all(weights, hessian, pattern, prune, prune_options, stack, previous=None)
        return [LoopResult(s, w.new_zeros(w.shape[0], 0), w.new_zeros(w.shape[1], 0),
                           [residual_objective(w - s, h)], 1) for w, s in zip(weights, sparse)]

    began = time.perf_counter()
    states = [_LayerState(w, r, g, f) for w, r, g, f in
              zip(weights, ranks, generators, warm or [None] * len(weights))]
    for iteration in range(1, iterations + 1):
        active = [st for st in states if not st.stopped]
        if not active:
            break
        refresh = (iteration - 1) % refresh_every == 0  # always on iteration 1
        if start == "sparse":
            with timed(clock, "P1"):
                _sparse_step(active, hessian, pattern, prune, prune_options, stack, iteration,
                             refresh, refine_iterations, after_lowrank=False)
        with timed(clock, "P2"):
            for st in active:
                st.factors = lowrank(st.weight - st.sparse, hessian, st.rank,
                                     **loop_keywords(lowrank, warm=st.factors, iteration=iteration,
                                                     generator=st.generator), **lowrank_options)
        if start == "lowrank":
            with timed(clock, "P1"):
                _sparse_step(active, hessian, pattern, prune, prune_options, stack, iteration,
                             refresh, refine_iterations, after_lowrank=True)
        with timed(clock, "objective"):
            for st in active:
                st.record(residual_objective(st.weight - st.sparse - _product(st.factors, st.weight), h),
                          iteration, tolerance, patience)
                st.timeline.append(time.perf_counter() - began)
    return [st.best for st in states]


def alternate_auto(weights: list[torch.Tensor], hessian: PreparedHessian, pattern: SparsityPattern,
                   ranks: list[int], *, iterations: int, probe: int = DEFAULT_PROBE,
                   **options) -> list[LoopResult]:
    """Probe both starts for ``probe`` iterations, then continue the better one per layer.

    Neither start wins everywhere: where U Vᵀ can carry almost the whole layer (SmolLM2's
    k_proj at rank 64) pruning first stalls far above OATS, while on MLP layers fitting the
    low-rank part first ends a few percent worse. The better start is already ahead after a
    few iterations, so the probe costs ``probe`` extra iterations. Timelines count both
    probes as if run side by side, then the continuation.
    """
    if options.get("lowrank") is None or all(r == 0 for r in ranks):
        return alternate_many(weights, hessian, pattern, ranks, iterations=iterations, **options)
    length = min(probe, iterations)
    first = alternate_many(weights, hessian, pattern, ranks, iterations=length, start="sparse", **options)
    second = alternate_many(weights, hessian, pattern, ranks, iterations=length, start="lowrank", **options)
    chosen = [a if min(a.history) <= min(b.history) else b for a, b in zip(first, second)]
    spent = [[ta + tb for ta, tb in zip(a.timeline, b.timeline)] for a, b in zip(first, second)]
    if iterations <= length:
        return [replace(c, timeline=t) for c, t in zip(chosen, spent)]
    rest = alternate_many(weights, hessian, pattern, ranks, iterations=iterations - length, start="sparse",
                          warm=[(c.U, c.V) for c in chosen], **options)
    results = []
    for c, r, t in zip(chosen, rest, spent):
        offset = first[0].timeline[-1] + second[0].timeline[-1]
        best = c if min(c.history) <= min(r.history) else r
        results.append(replace(best, history=c.history + r.history, timeline=t + [offset + x for x in r.timeline],
                               best_iteration=c.best_iteration if best is c else length + r.best_iteration))
    return results


class _LayerState:
    """One layer's iterate, history and best-so-far inside the lockstep loop."""

    def __init__(self, weight, rank, generator, factors):
        self.weight, self.rank, self.generator, self.factors = weight, rank, generator, factors
        self.sparse = torch.zeros_like(weight)
        self.history: list[float] = []
        self.timeline: list[float] = []
        self.best: LoopResult | None = None
        self.best_value = float("inf")
        self.stopped = False

    def record(self, value: float, iteration: int, tolerance: float, patience: int) -> None:
        self.history.append(value)
        if self.best is None or value < self.best_value:
            self.best_value = value
            self.best = LoopResult(self.sparse, self.factors[0], self.factors[1], self.history, iteration,
                                   self.timeline)
        if tolerance > 0 and len(self.history) > patience:
            reference = min(self.history[:-patience])
            if reference - min(self.history[-patience:]) <= tolerance * reference:
                logger.debug("stopping after %d iterations: improvement below %g", iteration, tolerance)
                self.stopped = True


def _sparse_step(active, hessian, pattern, prune, prune_options, stack, iteration, refresh,
                 refine_iterations, after_lowrank: bool) -> None:
    if refresh:  # iteration 1 always refreshes, so a refit always finds P2's factors
        targets = [st.weight - _product(st.factors, st.weight) for st in active]
        previous = [st.sparse for st in active] if iteration > 1 else None
        for st, sparse in zip(active, _prune_all(targets, hessian, pattern, prune, prune_options,
                                                  stack, previous)):
            st.sparse = sparse
        return
    for st in active:  # keep the support; S and U jointly optimal for the current V
        U, V = st.factors
        st.sparse = refit_on_support(st.weight, hessian.damped, st.sparse != 0, st.sparse,
                                     iterations=refine_iterations, basis=V)
        if after_lowrank:  # no P2 follows in this iteration: pair S with the U the refit assumed
            st.factors = (coefficients_for_basis(st.weight - st.sparse, hessian.damped, V).to(U.dtype), V)


def _prune_all(targets, hessian, pattern, prune, prune_options, stack, previous):
    if stack and len(targets) > 1:
        rows = [t.shape[0] for t in targets]
        prev = torch.cat(previous) if previous is not None else None
        return list(prune(torch.cat(targets), hessian, pattern, **loop_keywords(prune, previous=prev),
                          **prune_options).split(rows))
    return [prune(t, hessian, pattern, **loop_keywords(prune, previous=None if previous is None else previous[i]),
                  **prune_options)
            for i, t in enumerate(targets)]


def _product(factors: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
    return factors[0] @ factors[1].mT if factors is not None else torch.zeros_like(like)
