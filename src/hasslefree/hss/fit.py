"""Fitting an :class:`HSSMatrix` to a dense residual, in Frobenius norm or on the layer objective.

Frobenius fit: each off-diagonal block is its own truncated SVD; leaves copy the residual.

Data-aware fit of ``f(A_hat) = tr((A - A_hat) H (A - A_hat)^T)`` with H = L L^T. Whitening the
whole residual (``A L``), fitting, and mapping back with ``L^{-1}`` would mix every column
block through the dense ``L^{-1}`` and destroy the block structure. Instead each block is
whitened with the Cholesky factor of *its own column block* of H: a rank-k block
``B ~= C_k(B' L_b) L_b^{-1}`` stays rank k, so the tree stays valid. Alone, that ignores the
coupling between column blocks through H's off-diagonal part, which is then recovered
exactly by block coordinate descent on the true objective:

* leaves: given all low-rank blocks, the best dense leaf in its row band is
  ``D = A + C H_ll^{-1}`` with ``C = E_rest H_rest,l`` (each row band holds exactly one
  leaf, so all leaves are optimal at once);
* low-rank blocks (``sweeps`` passes): given everything else, the best rank-k block is
  ``C_k((A + C H_bb^{-1}) L_b) L_b^{-1}``.

Every step is an exact minimiser of the (damped) objective over its block, so the objective
never increases after the block-diagonal start. ``G = E H`` is kept up to date so each step
costs one (rows x cols x in) product, never an (out x out) one.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from hasslefree.hessian import prepare_hessian
from hasslefree.objective import residual_objective

from .budget import RankRule
from .matrix import HSSMatrix, hss_partition

__all__ = ["damp_hessian", "fit_hss", "layer_objective"]

logger = logging.getLogger(__name__)


def layer_objective(error: Tensor, hessian: Tensor) -> float:
    """``tr(E H E^T)`` in float64 (the shared expanded-trace objective)."""
    return residual_objective(error.to(torch.float64), hessian.to(torch.float64))


def damp_hessian(hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """float64 damped H (dead inputs set to 1, escalation until Cholesky succeeds).

    The same preparation the sparse + low-rank solvers use, so both fit one objective.
    """
    return prepare_hessian(0.5 * (hessian + hessian.T), percdamp=percdamp, dtype=torch.float64).damped


def _truncated(mat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Balanced rank-k factors (U sqrt(s), V sqrt(s)) of the best rank-k approximation."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:k].sqrt()
    return u[:, :k] * root, vh[:k].T * root


def _whitened_block(target_white: Tensor, chol: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rank-k ``C_k(T L) L^{-1}`` as factors (P, Q), given ``T L`` and L (lower)."""
    p, v = _truncated(target_white, k)
    # Q^T = V^T L^{-1}  <=>  Q = L^{-T} V : solve L^T Q = V.
    q = torch.linalg.solve_triangular(chol.T, v, upper=True)
    return p, q


def fit_hss(
    residual: Tensor,
    outer_rank: int,
    leaf: int,
    rule: RankRule | None = None,
    hessian: Tensor | None = None,
    *,
    sweeps: int = 1,
    percdamp: float = 0.01,
    out_dtype: torch.dtype | None = None,
) -> HSSMatrix:
    """HSS approximation of ``residual`` (out x in); data-aware when ``hessian`` is given.

    Computation is float64; factors are returned in ``out_dtype`` (default: residual's).
    """
    out_dtype = out_dtype or residual.dtype
    a = residual.detach().to(torch.float64)
    leaves, lowrank = hss_partition(tuple(a.shape), outer_rank, leaf, rule)
    if hessian is None:
        dense = [a[b.r0 : b.r1, b.c0 : b.c1].clone() for b in leaves]
        factors = [_truncated(a[b.r0 : b.r1, b.c0 : b.c1], b.rank) for b in lowrank]
    else:
        if tuple(hessian.shape) != (a.shape[1], a.shape[1]):
            raise ValueError(f"hessian must be {a.shape[1]} x {a.shape[1]}, got {tuple(hessian.shape)}")
        dense, factors = _fit_whitened(a, damp_hessian(hessian, percdamp), leaves, lowrank, sweeps)
    cast = lambda t: t.to(out_dtype).contiguous()  # noqa: E731
    return HSSMatrix(
        tuple(a.shape),
        leaf,
        leaves,
        lowrank,
        [cast(d) for d in dense],
        [cast(p) for p, _ in factors],
        [cast(q) for _, q in factors],
    )


def _fit_whitened(a: Tensor, h: Tensor, leaves, lowrank, sweeps: int):
    """Block-diagonal whitened start, then exact block coordinate descent (see module doc)."""
    chols: dict[tuple[int, int], Tensor] = {}

    def chol(c0: int, c1: int) -> Tensor:
        if (c0, c1) not in chols:
            chols[(c0, c1)] = torch.linalg.cholesky(h[c0:c1, c0:c1])
        return chols[(c0, c1)]

    # Start: every low-rank block whitened by its own column block; leaves exact.
    factors = []
    for b in lowrank:
        lb = chol(b.c0, b.c1)
        factors.append(_whitened_block(a[b.r0 : b.r1, b.c0 : b.c1] @ lb, lb, b.rank))
    approx = torch.zeros_like(a)
    for b, (p, q) in zip(lowrank, factors):
        approx[b.r0 : b.r1, b.c0 : b.c1] = p @ q.T
    for b in leaves:
        approx[b.r0 : b.r1, b.c0 : b.c1] = a[b.r0 : b.r1, b.c0 : b.c1]
    err = a - approx
    grad = err @ h  # G = E H, kept current below

    def coupling(r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """C = E_rest H_rest,b for the block: G restricted minus the block's own part."""
        return grad[r0:r1, c0:c1] - err[r0:r1, c0:c1] @ h[c0:c1, c0:c1]

    def commit(r0: int, r1: int, c0: int, c1: int, new_err: Tensor) -> None:
        delta = new_err - err[r0:r1, c0:c1]
        grad[r0:r1] += delta @ h[c0:c1]
        err[r0:r1, c0:c1] = new_err

    def refit_leaves() -> None:
        for b in leaves:
            c = coupling(b.r0, b.r1, b.c0, b.c1)
            lb = chol(b.c0, b.c1)
            # D = A + C H_ll^{-1}  =>  E_leaf = -C H_ll^{-1}
            correction = torch.cholesky_solve(c.T, lb).T
            commit(b.r0, b.r1, b.c0, b.c1, -correction)

    refit_leaves()
    logger.debug("whitened start + leaves: objective %.6g", float((grad * err).sum()))
    for sweep in range(sweeps):
        for i, b in enumerate(lowrank):
            c = coupling(b.r0, b.r1, b.c0, b.c1)
            lb = chol(b.c0, b.c1)
            block = a[b.r0 : b.r1, b.c0 : b.c1]
            # (A + C H^{-1}) L = A L + C L^{-T}
            target_white = block @ lb + torch.linalg.solve_triangular(lb, c.T, upper=False).T
            p, q = _whitened_block(target_white, lb, b.rank)
            factors[i] = (p, q)
            commit(b.r0, b.r1, b.c0, b.c1, block - p @ q.T)
        refit_leaves()
        logger.debug("sweep %d: objective %.6g", sweep + 1, float((grad * err).sum()))
    dense = [a[b.r0 : b.r1, b.c0 : b.c1] - err[b.r0 : b.r1, b.c0 : b.c1] for b in leaves]
    return dense, factors
