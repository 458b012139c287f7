"""The public one-layer API: ``decompose_layer`` and its result, ``Decomposition`` (argument checks
in :mod:`hasslefree.layer_checks`; ``resolve_layer`` and the ``check_*`` helpers are re-exported)."""

from __future__ import annotations

import logging
from functools import partial
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from hasslefree.alternating import alternate_auto, alternate_many
from hasslefree.hessian import PreparedHessian, prepare_hessian
from hasslefree.layer_checks import (check_numeric_options, check_solver_options, resolve_layer,
                                     validate_layer_arguments, validate_loop_options)
from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.objective import layer_objective, residual_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import get_method
from hasslefree.rank_policy import RankPolicy, parameter_count
from hasslefree.solver_calls import option_values, typed_options
from hasslefree.stage_clock import add_seconds
from hasslefree.sparse import SPARSE_SOLVERS

logger = logging.getLogger(__name__)

__all__ = ["Decomposition", "check_numeric_options", "check_solver_options", "decompose_group", "decompose_layer",
           "resolve_layer"]


@dataclass
class Decomposition:
    """W ≈ sparse + U Vᵀ for one layer, with how it was obtained."""

    weight: torch.Tensor
    sparse: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    pattern: SparsityPattern
    method: str
    history: list[float]
    seconds: float
    best_iteration: int
    initial_objective: float
    timeline: list[float] = field(default_factory=list)  # loop seconds at each iteration's end
    damped_relative_objective: float | None = None  # f/f(0) of the result under the solvers' damped H

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def iterations(self) -> int:
        return len(self.history)

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.pattern, self.rank, *self.weight.shape)

    def to_dense(self) -> torch.Tensor:
        return self.sparse + self.U @ self.V.mT

    def objective(self, hessian: torch.Tensor) -> float:
        """tr((W − Ŵ) H (W − Ŵ)ᵀ) for the given H."""
        return layer_objective(self.weight, self.to_dense(), hessian.to(self.weight.dtype))

    def relative_objective(self, hessian: torch.Tensor) -> float:
        """f(Ŵ) / f(0): the fraction of the layer's output energy that is lost."""
        base = layer_objective(self.weight, torch.zeros_like(self.weight), hessian.to(self.weight.dtype))
        return self.objective(hessian) / base if base > 0 else 0.0


def decompose_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    pattern: str | SparsityPattern = "2:4",
    rank: int | RankPolicy = 64,
    method: str = "hassle-free",
    iterations: int | None = None,
    seed: int = 0,
    *,
    sparse_solver: str | None = None,
    lowrank_solver: str | None = None,
    start: str | None = None,
    tolerance: float | None = None,
    patience: int = 5,
    percdamp: float = 0.01,
    coordinate_damp: float = 0.0,
    dtype: torch.dtype = torch.float32,
    sparse_options: dict | None = None,
    lowrank_options: dict | None = None,
    loop_options: dict | None = None,
    name: str = "layer",
    clock: dict[str, float] | None = None,
) -> Decomposition:
    """Decompose one linear layer's weight (out x in) into sparse + low rank.

    ``hessian`` is XᵀX (in x in) of the layer's inputs (any positive scale; a running mean
    is typical), or a :class:`PreparedHessian` shared by layers with the same input (then
    ``percdamp``/``coordinate_damp``/``dtype`` of that preparation apply). ``method`` names
    a preset (see :data:`hasslefree.presets.PRESETS`); ``sparse_solver``/``lowrank_solver``/
    ``start`` override its parts, so any P1 can be combined with any P2. ``tolerance``
    (default: the method's) stops early once the best objective improves by less than that
    fraction over ``patience`` iterations. ``loop_options`` override the preset's loop settings:
    ``refresh_every`` (prune every k-th iteration, refit the kept support in between),
    ``refine_iterations`` (PCG steps of those refits) and ``probe`` (iterations of each order
    when ``start="auto"``). Every argument is checked before any work is done.
    ``clock`` (a dict) accumulates seconds per stage: "prepare" (H), "P1", "P2", "objective".
    """
    settings = dict(pattern=pattern, rank=rank, method=method, iterations=iterations, seed=seed,
                    sparse_solver=sparse_solver, lowrank_solver=lowrank_solver, start=start,
                    tolerance=tolerance, patience=patience, sparse_options=sparse_options,
                    lowrank_options=lowrank_options, loop_options=loop_options, clock=clock)
    raw = hessian.raw if isinstance(hessian, PreparedHessian) else hessian
    validate_layer_arguments(weight, raw, pattern, rank, method, iterations, sparse_solver, lowrank_solver, start, name,
              sparse_options, lowrank_options)
    validate_loop_options(loop_options)
    check_numeric_options(percdamp=percdamp, coordinate_damp=coordinate_damp, tolerance=tolerance, patience=patience)
    began = time.perf_counter()
    prepared = (hessian if isinstance(hessian, PreparedHessian) else
                prepare_hessian(hessian, percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=dtype))
    add_seconds(clock, "prepare", began)
    return _run({name: weight}, prepared, settings, stack=False, began=began)[name]


def decompose_group(
    weights: Mapping[str, torch.Tensor],
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    coordinate_damp: float = 0.0,
    dtype: torch.dtype = torch.float32,
    stack: bool = True,
    **options,
) -> dict[str, Decomposition]:
    """Decompose layers that read the same input (q/k/v, gate/up) with one shared H.

    H is prepared (damped, factored, inverted) once for the whole group; ``options`` are
    those of :func:`decompose_layer` and apply to every layer. All layers are validated
    before any is decomposed. With ``stack`` and a row-separable P1 (SparseGPT, Wanda or
    magnitude with an N:M or per-row pattern) the layers run in lockstep with their P1
    targets stacked into one call: the same result as separate calls, less overhead. The
    group's wall time is then shared among its layers in proportion to their rows.
    """
    settings = {key: options.get(key, default) for key, default in _DEFAULTS.items()}
    for name, weight in weights.items():
        validate_layer_arguments(weight, hessian, settings["pattern"], settings["rank"], settings["method"],
                  settings["iterations"], settings["sparse_solver"], settings["lowrank_solver"],
                  settings["start"], name, settings["sparse_options"], settings["lowrank_options"])
    validate_loop_options(settings["loop_options"])
    check_numeric_options(percdamp=percdamp, coordinate_damp=coordinate_damp, tolerance=settings["tolerance"],
                          patience=settings["patience"])
    began = time.perf_counter()
    prepared = prepare_hessian(hessian, percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=dtype)
    add_seconds(settings["clock"], "prepare", began)
    return _run(dict(weights), prepared, settings, stack=stack, began=began)


_DEFAULTS = dict(pattern="2:4", rank=64, method="hassle-free", iterations=None, seed=0,
                 sparse_solver=None, lowrank_solver=None, start=None, tolerance=None, patience=5,
                 sparse_options=None, lowrank_options=None, loop_options=None, clock=None)
_ROW_SEPARABLE = {"magnitude", "wanda", "sparsegpt"}


def _run(weights: dict[str, torch.Tensor], prepared: PreparedHessian, settings: dict, *,
         stack: bool, began: float) -> dict[str, Decomposition]:
    """Solve already-validated layers that share ``prepared``; stack P1 when it is exact."""
    spec = get_method(settings["method"])
    sparse_name = settings["sparse_solver"] or spec.sparse
    lowrank_name = settings["lowrank_solver"] or spec.lowrank
    base_pattern = SparsityPattern.parse(settings["pattern"])
    policy = settings["rank"] if isinstance(settings["rank"], RankPolicy) else RankPolicy.fixed(int(settings["rank"]))
    targets, ranks, patterns = [], [], []
    for weight in weights.values():
        target = weight.to(prepared.raw.dtype).clone()
        target[:, prepared.dead] = 0  # inputs that never fire: their columns cannot matter
        rank, pattern = policy.resolve(base_pattern, *target.shape)
        targets.append(target)
        ranks.append(rank)
        patterns.append(pattern)
    separable = sparse_name in _ROW_SEPARABLE and base_pattern.kind in {"nm", "row", "dense"}
    groups = [list(range(len(targets)))] if stack and separable else [[i] for i in range(len(targets))]
    results: dict[int, object] = {}
    for members in groups:
        start = settings["start"] or spec.start
        solve = alternate_auto if start == "auto" else partial(alternate_many, start=start)
        loop_options = {k: v for k, v in {**spec.loop_options, **(settings["loop_options"] or {})}.items()
                        if start == "auto" or k != "probe"}
        loop = solve(
            [targets[i] for i in members], prepared, patterns[members[0]], [ranks[i] for i in members],
            prune=SPARSE_SOLVERS[sparse_name],
            lowrank=LOWRANK_SOLVERS[lowrank_name] if lowrank_name else None,
            iterations=settings["iterations"] or spec.iterations,
            tolerance=spec.tolerance if settings["tolerance"] is None else settings["tolerance"],
            patience=settings["patience"],
            generators=[torch.Generator().manual_seed(settings["seed"]) for _ in members],
            prune_options=option_values(typed_options(SPARSE_SOLVERS[sparse_name],
                                                      {**spec.sparse_options, **(settings["sparse_options"] or {})})),
            lowrank_options=(option_values(typed_options(LOWRANK_SOLVERS[lowrank_name],
                                                         {**spec.lowrank_options, **(settings["lowrank_options"] or {})}))
                             if lowrank_name else {}),
            stack=len(members) > 1,
            clock=settings["clock"],
            **loop_options,
        )
        results.update(zip(members, loop))
    seconds = time.perf_counter() - began
    total_rows = sum(t.shape[0] for t in targets)
    out = {}
    for i, name in enumerate(weights):
        result = results[i]
        initial = layer_objective(targets[i], torch.zeros_like(targets[i]), prepared.raw)
        damped_base = residual_objective(targets[i], prepared.damped)
        residual = targets[i] - result.sparse - result.U @ result.V.mT
        damped = residual_objective(residual, prepared.damped) / damped_base if damped_base > 0 else 0.0
        logger.debug("%s: %s %s rank %d, f/f0 %.4g in %d iterations", name, settings["method"],
                     patterns[i], ranks[i], min(result.history) / max(initial, 1e-30), len(result.history))
        out[name] = Decomposition(weight=targets[i], sparse=result.sparse, U=result.U, V=result.V,
                                  pattern=patterns[i], method=settings["method"], history=result.history,
                                  seconds=seconds * targets[i].shape[0] / total_rows,
                                  best_iteration=result.best_iteration, initial_objective=initial,
                                  timeline=result.timeline, damped_relative_objective=damped)
    return out
