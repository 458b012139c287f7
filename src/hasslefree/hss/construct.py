"""Sparse + HSS construction of one weight matrix: extract S, permute, fit the residual.

Variants (the name lists the steps):

* ``shss``: magnitude S, HSS of W - S in the original order, Frobenius fit;
* ``shss-rcm``: as above after a reverse Cuthill-McKee permutation from S's pattern;
* ``shss-whitened`` / ``shss-rcm-whitened``: the HSS part fits the layer objective
  ``tr((W - W_hat) H (W - W_hat)^T)`` instead of the Frobenius norm (see :mod:`.fit`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee
from torch import Tensor

from .budget import RankRule, sparse_count
from .fit import fit_hss
from .matrix import HSSMatrix

__all__ = [
    "VARIANTS",
    "DATA_AWARE_VARIANTS",
    "SparsePart",
    "HSSDecomposition",
    "magnitude_sparse",
    "rcm_permutation",
    "pattern_bandwidth",
    "decompose",
]

logger = logging.getLogger(__name__)

VARIANTS = ("shss", "shss-rcm", "shss-whitened", "shss-rcm-whitened")
DATA_AWARE_VARIANTS = ("shss-whitened", "shss-rcm-whitened")


@dataclass
class SparsePart:
    """S in CSR form, original (unpermuted) indices; ``values`` may contain exact zeros."""

    shape: tuple[int, int]
    crow: Tensor  # int64 (out + 1)
    col: Tensor  # int64 (nnz)
    values: Tensor  # (nnz)

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def rows(self) -> Tensor:
        """Row index of every stored entry (COO rows)."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), counts)

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        out[self.rows(), self.col] = self.values
        return out


@dataclass
class HSSDecomposition:
    """``W_hat = S + (HSS in permuted order)``, with ``hss ~= (W - S)[row_perm][:, col_perm]``."""

    sparse: SparsePart
    row_perm: Tensor
    col_perm: Tensor
    hss: HSSMatrix
    variant: str


def magnitude_sparse(weight: Tensor, sparsity: float) -> SparsePart:
    """S = the ``floor(sparsity * numel)`` largest-|w| weights, exact count (ties arbitrary).

    Built from indices rather than ``to_sparse_csr`` so that exact zeros that make the cut
    (only at extreme sparsity) are still counted and stored.
    """
    m, n = weight.shape
    k = sparse_count(m * n, sparsity)
    flat = weight.reshape(-1)
    if k == 0:
        idx = torch.zeros(0, dtype=torch.int64, device=weight.device)
    else:
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    rows, cols = idx // n, idx % n
    crow = torch.zeros(m + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0)
    return SparsePart((m, n), crow, cols, flat[idx].clone())


def rcm_permutation(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders from reverse Cuthill-McKee on the bipartite graph of S.

    RCM needs a symmetric graph and W is rectangular. We order the (out + in) nodes of
    ``[[0, S], [S^T, 0]]`` and split the order into rows and columns, keeping relative
    order. One breadth-first ordering places every row next to the columns it touches,
    so after the split row i's position among rows tracks its columns' position among
    columns and S gathers along the scaled diagonal ``i/out ~= j/in`` that the HSS
    halving follows. Ordering ``S S^T`` and ``S^T S`` separately would decouple the two
    orders (nothing aligns them) and, at ~30 % density, those products are nearly
    complete graphs; the bipartite graph costs O(nnz). On unstructured magnitude masks of
    real weights at ~30 % density the graph's diameter is tiny and RCM barely narrows the
    band; it pays off when S's pattern has structure to recover.
    """
    m, n = shape
    data = np.ones(len(rows), dtype=np.int8)
    top = sp.coo_matrix((data, (np.asarray(rows), np.asarray(cols) + m)), shape=(m + n, m + n))
    graph = (top + top.T).tocsr()
    order = np.asarray(reverse_cuthill_mckee(graph, symmetric_mode=True), dtype=np.int64)
    row_perm = order[order < m]
    col_perm = order[order >= m] - m
    return row_perm, col_perm


def pattern_bandwidth(rows: Tensor, cols: Tensor, shape: tuple[int, int], row_perm=None, col_perm=None) -> float:
    """Max distance of a nonzero from the scaled diagonal, ``max |i * in/out - j|``, after permuting.

    ``row_perm[p]`` is the original row placed at position p (same for columns).
    """
    m, n = shape
    rows = torch.as_tensor(rows, dtype=torch.int64)
    cols = torch.as_tensor(cols, dtype=torch.int64)
    if rows.numel() == 0:
        return 0.0
    if row_perm is not None:
        rows = _inverse(torch.as_tensor(row_perm, dtype=torch.int64))[rows]
    if col_perm is not None:
        cols = _inverse(torch.as_tensor(col_perm, dtype=torch.int64))[cols]
    return float((rows.to(torch.float64) * (n / m) - cols.to(torch.float64)).abs().max())


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def decompose(
    weight: Tensor,
    *,
    sparsity: float,
    outer_rank: int,
    leaf: int,
    rule: RankRule,
    variant: str,
    hessian: Tensor | None = None,
    sweeps: int = 1,
    percdamp: float = 0.01,
) -> HSSDecomposition:
    """Run the three construction steps; arguments are assumed validated by the caller.

    With an empty S (sparsity 0) there is no graph to order, so the identity is used.
    """
    m, n = weight.shape
    sparse = magnitude_sparse(weight, sparsity)
    if "rcm" in variant and sparse.nnz > 0:
        rp, cp = rcm_permutation(sparse.rows().cpu().numpy(), sparse.col.cpu().numpy(), (m, n))
        row_perm = torch.from_numpy(rp).to(weight.device)
        col_perm = torch.from_numpy(cp).to(weight.device)
    else:
        row_perm = torch.arange(m, device=weight.device)
        col_perm = torch.arange(n, device=weight.device)
    residual = weight.detach().to(torch.float64) - sparse.to_dense().to(torch.float64)
    residual = residual[row_perm][:, col_perm]
    h = None
    if variant in DATA_AWARE_VARIANTS:
        h = hessian[col_perm][:, col_perm]
    hss = fit_hss(
        residual, outer_rank, leaf, rule, h, sweeps=sweeps, percdamp=percdamp, out_dtype=weight.dtype
    )
    logger.debug(
        "decompose %s %dx%d: nnz(S)=%d, hss params=%d, ranks=%s",
        variant, m, n, sparse.nnz, hss.parameter_count(), hss.ranks_by_depth(),
    )
    return HSSDecomposition(sparse, row_perm, col_perm, hss, variant)
