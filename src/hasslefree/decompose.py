"""The public one-layer API: ``decompose_layer`` and its result, ``Decomposition``."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from hasslefree.alternating import alternate
from hasslefree.hessian import PreparedHessian, prepare_hessian
from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.objective import layer_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import get_method
from hasslefree.rank_policy import RankPolicy, parameter_count
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
    tolerance: float = 0.0,
    patience: int = 5,
    percdamp: float = 0.01,
    coordinate_damp: float = 0.0,
    dtype: torch.dtype = torch.float32,
    sparse_options: dict | None = None,
    lowrank_options: dict | None = None,
    name: str = "layer",
) -> Decomposition:
    """Decompose one linear layer's weight (out x in) into sparse + low rank.

    ``hessian`` is XᵀX (in x in) of the layer's inputs (any positive scale; a running mean
    is typical), or a :class:`PreparedHessian` shared by layers with the same input (then
    ``percdamp``/``coordinate_damp``/``dtype`` of that preparation apply). ``method`` names a preset (see :data:`hasslefree.presets.PRESETS`);
    ``sparse_solver``/``lowrank_solver``/``start`` override its parts, so any P1 can be
    combined with any P2. Every argument is checked before any work is done.
    """
    raw_hessian = hessian.raw if isinstance(hessian, PreparedHessian) else hessian
    pattern, rank_value, method_spec = _validate(weight, raw_hessian, pattern, rank, method, iterations,
                                                 sparse_solver, lowrank_solver, start, name)
    sparse_name = sparse_solver or method_spec.sparse
    lowrank_name = lowrank_solver or method_spec.lowrank
    began = time.perf_counter()
    prepared = (hessian if isinstance(hessian, PreparedHessian) else
                prepare_hessian(hessian, percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=dtype))
    target = weight.to(prepared.raw.dtype).clone()
    target[:, prepared.dead] = 0  # inputs that never fire: their columns cannot matter
    generator = torch.Generator().manual_seed(seed)
    result = alternate(
        target, prepared, pattern, rank_value,
        prune=SPARSE_SOLVERS[sparse_name],
        lowrank=LOWRANK_SOLVERS[lowrank_name] if lowrank_name else None,
        iterations=iterations or method_spec.iterations,
        start=start or method_spec.start,
        tolerance=tolerance, patience=patience, generator=generator,
        prune_options={**method_spec.sparse_options, **(sparse_options or {})},
        lowrank_options={**method_spec.lowrank_options, **(lowrank_options or {})},
    )
    seconds = time.perf_counter() - began
    initial = layer_objective(target, torch.zeros_like(target), prepared.raw)
    logger.debug("%s: %s %s rank %d, f/f0 %.4g in %d iterations (%.2fs)", name, method, pattern,
                 rank_value, result.history[result.best_iteration - 1] / max(initial, 1e-30),
                 len(result.history), seconds)
    return Decomposition(weight=target, sparse=result.sparse, U=result.U, V=result.V,
                         pattern=pattern, method=method, history=result.history, seconds=seconds,
                         best_iteration=result.best_iteration, initial_objective=initial)


def decompose_group(
    weights: Mapping[str, torch.Tensor],
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    coordinate_damp: float = 0.0,
    dtype: torch.dtype = torch.float32,
    **options,
) -> dict[str, Decomposition]:
    """Decompose layers that read the same input (q/k/v, gate/up) with one shared H.

    H is prepared (damped, factored, inverted) once for the whole group; ``options`` are
    those of :func:`decompose_layer` and apply to every layer. All layers are validated
    before any is decomposed.
    """
    for name, weight in weights.items():
        _validate(weight, hessian, options.get("pattern", "2:4"), options.get("rank", 64),
                  options.get("method", "hassle-free"), options.get("iterations"),
                  options.get("sparse_solver"), options.get("lowrank_solver"), options.get("start"), name)
    prepared = prepare_hessian(hessian, percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=dtype)
    return {name: decompose_layer(weight, prepared, name=name, **options)
            for name, weight in weights.items()}


def _validate(weight, hessian, pattern, rank, method, iterations, sparse_solver, lowrank_solver,
              start, name):
    """All argument checks, so bad input fails with a clear message before any work."""
    method_spec = get_method(method)
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
    pattern = SparsityPattern.parse(pattern)
    pattern.validate_shape(out_features, in_features, name)
    policy = rank if isinstance(rank, RankPolicy) else RankPolicy.fixed(int(rank))
    rank_value, pattern = policy.resolve(pattern, out_features, in_features)
    if rank_value > min(out_features, in_features):
        raise ValueError(f"{name}: rank {rank_value} exceeds min(out, in) = "
                         f"{min(out_features, in_features)}")
    if sparse_solver is not None and sparse_solver not in SPARSE_SOLVERS:
        raise ValueError(f"unknown sparse solver {sparse_solver!r}; choose one of {', '.join(SPARSE_SOLVERS)}")
    if lowrank_solver is not None and lowrank_solver not in LOWRANK_SOLVERS:
        raise ValueError(f"unknown low-rank solver {lowrank_solver!r}; choose one of "
                         f"{', '.join(LOWRANK_SOLVERS)}")
    if (lowrank_solver or method_spec.lowrank) is None and rank_value > 0:
        raise ValueError(f"method {method!r} prunes only: pass rank=0, or choose a sparse + low-rank "
                         "method such as 'hassle-free' or 'oats'")
    if start is not None and start not in {"sparse", "lowrank"}:
        raise ValueError(f"start must be 'sparse' or 'lowrank', got {start!r}")
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return pattern, rank_value, dataclasses.replace(method_spec)
