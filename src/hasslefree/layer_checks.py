"""Argument checks of the one-layer API (:mod:`hasslefree.decompose`) and of the pipeline: a
layer's settings from its shape alone, solver options, damping and loop options — so bad input
fails with a clear message before any work."""

from __future__ import annotations

import math

import torch

from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import get_method
from hasslefree.rank_policy import RankPolicy
from hasslefree.solver_calls import typed_options
from hasslefree.sparse import SPARSE_SOLVERS

__all__ = ["check_numeric_options", "check_solver_options", "resolve_layer", "validate_layer_arguments",
           "validate_loop_options"]


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


def validate_loop_options(options: dict | None) -> None:
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


def validate_layer_arguments(weight, hessian, pattern, rank, method, iterations, sparse_solver, lowrank_solver,
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
