"""The public one-layer API: ``decompose_layer`` and its result, ``Decomposition``."""

from __future__ import annotations

import logging
import math
from functools import partial
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from hasslefree.alternating import alternate_auto, alternate_many
from hasslefree.hessian import PreparedHessian, prepare_hessian
from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.objective import layer_objective, residual_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import get_method
from hasslefree.rank_policy import RankPolicy, parameter_count
from hasslefree.solver_calls import option_values, typed_options
from hasslefree.stage_clock import add_seconds
from hasslefree.sparse import SPARSE_SOLVERS

logger = logging.getLogger(__name__)


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
    _validate(weight, raw, pattern, rank, method, iterations, sparse_solver, lowrank_solver, start, name,
              sparse_options, lowrank_options)
    _validate_loop_options(loop_options)
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
        _validate(weight, hessian, settings["pattern"], settings["rank"], settings["method"],
                  settings["iterations"], settings["sparse_solver"], settings["lowrank_solver"],
                  settings["start"], name, settings["sparse_options"], settings["lowrank_options"])
    _validate_loop_options(settings["loop_options"])
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


def resolve_layer(out_features: int, in_features: int, pattern: str | SparsityPattern,
                  rank: int | RankPolicy, method: str, *, lowrank_solver: str | None = None,
                  name: str = "layer") -> tuple[int, SparsityPattern]:
    """Check a layer's settings from its shape alone; return its rank and final pattern.

    The checks every caller needs before work starts (a whole-model plan runs them on all
    layers first): the method exists, the pattern fits the width, the rank policy resolves
    to a rank within min(out, in), and pruning-only methods get rank 0. Messages start
    with ``name``.
    """
    method_spec = get_method(method)
    try:
        pattern = SparsityPattern.parse(pattern)
        pattern.validate_shape(out_features, in_features, name)
        if not isinstance(rank, RankPolicy) and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise ValueError(f"rank must be an integer or a RankPolicy, got {rank!r}")
        policy = rank if isinstance(rank, RankPolicy) else RankPolicy.fixed(rank)
        rank_value, pattern = policy.resolve(pattern, out_features, in_features)
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith(name) else f"{name}: {exc}") from None
    if rank_value > min(out_features, in_features):
        raise ValueError(f"{name}: rank {rank_value} exceeds min(out, in) = "
                         f"{min(out_features, in_features)}")
    if (lowrank_solver or method_spec.lowrank) is None and rank_value > 0:
        raise ValueError(f"{name}: method {method!r} prunes only, but rank {rank_value} was asked "
                         "for; pass rank 0 or choose a sparse + low-rank method such as "
                         "'hassle-free' or 'oats'")
    return rank_value, pattern


_LOOP_OPTIONS = ("refresh_every", "refine_iterations", "probe")


def check_numeric_options(*, percdamp: float = 0.01, coordinate_damp: float = 0.0, tolerance: float | None = None,
                          patience: int = 5) -> None:
    """Damping and early-stop values: finite and non-negative (patience a positive integer)."""
    for key, value in (("percdamp", percdamp), ("coordinate_damp", coordinate_damp), ("tolerance", tolerance)):
        if value is None and key == "tolerance":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")


def _validate_loop_options(options: dict | None) -> None:
    for key, value in (options or {}).items():
        if key not in _LOOP_OPTIONS:
            raise ValueError(f"unknown loop option {key!r}; choose from {', '.join(_LOOP_OPTIONS)}")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"loop option {key} must be an integer >= 1, got {value!r}")


def check_solver_options(method: str, sparse_solver: str | None = None, lowrank_solver: str | None = None,
                         sparse_options: dict | None = None, lowrank_options: dict | None = None) -> None:
    """``sparse_options``/``lowrank_options`` name only keywords that the method's P1/P2 solvers
    (or the overriding ones) declare; a ValueError names any other."""
    spec = get_method(method)
    _check_options_of("sparse", SPARSE_SOLVERS[sparse_solver or spec.sparse], sparse_options)
    if (lowrank_solver or spec.lowrank) is not None:
        _check_options_of("low-rank", LOWRANK_SOLVERS[lowrank_solver or spec.lowrank], lowrank_options)


def _check_options_of(kind: str, solver, options: dict | None) -> None:
    """``options`` must be options the solver declares, of the declared types, before any work."""
    typed_options(solver, options, f"{kind} solver")


def _validate(weight, hessian, pattern, rank, method, iterations, sparse_solver, lowrank_solver,
              start, name, sparse_options=None, lowrank_options=None):
    """All argument checks, so bad input fails with a clear message before any work."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a preset name (a string), got {method!r}")
    get_method(method)
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"{name}: weight must be a 2-D tensor (out x in)")
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"{name}: Hessian must be a square 2-D tensor, got shape "
                         f"{tuple(getattr(hessian, 'shape', ()))}")
    out_features, in_features = weight.shape
    if hessian.shape[0] != in_features:
        raise ValueError(f"{name}: Hessian is {hessian.shape[0]}x{hessian.shape[0]} but the weight "
                         f"has {in_features} inputs (expected {in_features}x{in_features})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: Hessian contains NaN or Inf")
    if sparse_solver is not None and sparse_solver not in SPARSE_SOLVERS:
        raise ValueError(f"unknown sparse solver {sparse_solver!r}; choose one of {', '.join(SPARSE_SOLVERS)}")
    if lowrank_solver is not None and lowrank_solver not in LOWRANK_SOLVERS:
        raise ValueError(f"unknown low-rank solver {lowrank_solver!r}; choose one of "
                         f"{', '.join(LOWRANK_SOLVERS)}")
    rank_value, pattern = resolve_layer(out_features, in_features, pattern, rank, method,
                                        lowrank_solver=lowrank_solver, name=name)
    check_solver_options(method, sparse_solver, lowrank_solver, sparse_options, lowrank_options)
    if start is not None and start not in {"sparse", "lowrank", "auto"}:
        raise ValueError(f"start must be 'sparse', 'lowrank' or 'auto', got {start!r}")
    return pattern, rank_value
