"""Hierarchical (HSS/HODLR-style) representation of a possibly rectangular matrix.

The matrix is split recursively into 2 x 2 blocks (rows and columns halved, so
rectangular shapes need no special case). The two off-diagonal blocks of every node are
stored as thin factors ``A ~= P @ Q.T``; diagonal blocks recurse until both sides are at
most ``leaf`` and are then stored dense. Each off-diagonal block has its own factors
(no nested bases), which keeps fitting a per-block truncated SVD.

The tree is only needed to *build* the partition: the leaves and the off-diagonal
blocks tile the matrix, so storage is two flat lists of tensors plus integer ranges.
That makes ``matmul`` a loop over blocks (never over tokens) and the state trivially
serialisable (safetensors for tensors, JSON for the spec).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .budget import RankRule, is_leaf

__all__ = ["LeafBlock", "LowRankBlock", "HSSMatrix", "hss_partition"]

logger = logging.getLogger(__name__)

SPEC_FORMAT = "hasslefree.hss"
SPEC_VERSION = 1


@dataclass(frozen=True)
class LeafBlock:
    """Dense diagonal block covering rows [r0, r1) and columns [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int


@dataclass(frozen=True)
class LowRankBlock:
    """Off-diagonal block of rank ``rank`` at tree ``depth`` (root = 0)."""

    r0: int
    r1: int
    c0: int
    c1: int
    rank: int
    depth: int


def hss_partition(
    shape: tuple[int, int], outer_rank: int, leaf: int, rule: RankRule | None = None
) -> tuple[list[LeafBlock], list[LowRankBlock]]:
    """Leaves and off-diagonal blocks of the tree, in pre-order. Rank-0 blocks are dropped."""
    rule = rule or RankRule()
    if leaf < 1:
        raise ValueError(f"leaf must be >= 1, got {leaf}")
    if outer_rank < 0:
        raise ValueError(f"outer_rank must be >= 0, got {outer_rank}")
    leaves: list[LeafBlock] = []
    lowrank: list[LowRankBlock] = []

    def split(r0: int, r1: int, c0: int, c1: int, depth: int) -> None:
        rows, cols = r1 - r0, c1 - c0
        if is_leaf(rows, cols, leaf):
            leaves.append(LeafBlock(r0, r1, c0, c1))
            return
        rm, cm = r0 + rows // 2, c0 + cols // 2
        split(r0, rm, c0, cm, depth + 1)
        for br0, br1, bc0, bc1 in ((r0, rm, cm, c1), (rm, r1, c0, cm)):
            k = rule.rank(outer_rank, depth, br1 - br0, bc1 - bc0)
            if k > 0:
                lowrank.append(LowRankBlock(br0, br1, bc0, bc1, k, depth))
        split(rm, r1, cm, c1, depth + 1)

    split(0, int(shape[0]), 0, int(shape[1]), 0)
    return leaves, lowrank


class HSSMatrix(nn.Module):
    """Thin-factor storage of an (out x in) matrix with ``matmul(x) = x @ A.T``.

    Factors are ``nn.Parameter`` so the structure can be fine-tuned end to end.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        leaf_size: int,
        leaves: list[LeafBlock],
        lowrank: list[LowRankBlock],
        dense: list[Tensor],
        p_factors: list[Tensor],
        q_factors: list[Tensor],
    ) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.leaf_size = int(leaf_size)
        self.leaves = list(leaves)
        self.lowrank = list(lowrank)
        if not (len(dense) == len(leaves) and len(p_factors) == len(q_factors) == len(lowrank)):
            raise ValueError("number of tensors does not match the block lists")
        for blk, d in zip(leaves, dense):
            if tuple(d.shape) != (blk.r1 - blk.r0, blk.c1 - blk.c0):
                raise ValueError(f"leaf {blk} has tensor of shape {tuple(d.shape)}")
        for blk, p, q in zip(lowrank, p_factors, q_factors):
            if tuple(p.shape) != (blk.r1 - blk.r0, blk.rank) or tuple(q.shape) != (blk.c1 - blk.c0, blk.rank):
                raise ValueError(f"block {blk} has factors {tuple(p.shape)}, {tuple(q.shape)}")
        covered = sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in leaves)
        covered += sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in lowrank)
        if covered > self.shape[0] * self.shape[1]:
            raise ValueError("blocks overlap: they cover more entries than the matrix has")
        self.dense = nn.ParameterList([nn.Parameter(d) for d in dense])
        self.p = nn.ParameterList([nn.Parameter(p) for p in p_factors])
        self.q = nn.ParameterList([nn.Parameter(q) for q in q_factors])

    # ------------------------------------------------------------------ compute
    def matmul(self, x: Tensor) -> Tensor:
        """``x @ A.T`` for x of shape (..., in), through the thin factors only."""
        m, n = self.shape
        if x.shape[-1] != n:
            raise ValueError(f"expected last dim {n}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        y = x2.new_zeros(x2.shape[0], m)
        for blk, d in zip(self.leaves, self.dense):
            y[:, blk.r0 : blk.r1] += x2[:, blk.c0 : blk.c1] @ d.T
        for blk, p, q in zip(self.lowrank, self.p, self.q):
            y[:, blk.r0 : blk.r1] += (x2[:, blk.c0 : blk.c1] @ q) @ p.T
        return y.reshape(*lead, m)

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)

    def to_dense(self) -> Tensor:
        """Assemble the full matrix (tests and diagnostics only)."""
        ref = self.dense[0] if len(self.dense) else self.p[0]
        out = torch.zeros(self.shape, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for blk, d in zip(self.leaves, self.dense):
                out[blk.r0 : blk.r1, blk.c0 : blk.c1] = d
            for blk, p, q in zip(self.lowrank, self.p, self.q):
                out[blk.r0 : blk.r1, blk.c0 : blk.c1] = p @ q.T
        return out

    def parameter_count(self) -> int:
        """Exact number of stored values (dense leaves plus both factors of every block)."""
        return sum(t.numel() for t in self.dense) + sum(p.numel() + q.numel() for p, q in zip(self.p, self.q))

    def ranks_by_depth(self) -> dict[int, list[int]]:
        """Ranks actually used, grouped by depth (for logs and reports)."""
        out: dict[int, list[int]] = {}
        for blk in self.lowrank:
            out.setdefault(blk.depth, []).append(blk.rank)
        return out

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, leaf={self.leaf_size}, leaves={len(self.leaves)}, "
            f"lowrank_blocks={len(self.lowrank)}, params={self.parameter_count()}"
        )

    # -------------------------------------------------------------- serialise
    def to_state(self, prefix: str = "") -> tuple[dict[str, Tensor], dict]:
        """Flat tensors (safetensors-ready) plus a JSON-able spec of plain ints."""
        tensors: dict[str, Tensor] = {}
        for i, d in enumerate(self.dense):
            tensors[f"{prefix}leaf.{i}"] = d.detach().contiguous()
        for i, (p, q) in enumerate(zip(self.p, self.q)):
            tensors[f"{prefix}p.{i}"] = p.detach().contiguous()
            tensors[f"{prefix}q.{i}"] = q.detach().contiguous()
        spec = {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "shape": list(self.shape),
            "leaf_size": self.leaf_size,
            "leaves": [[b.r0, b.r1, b.c0, b.c1] for b in self.leaves],
            "lowrank": [[b.r0, b.r1, b.c0, b.c1, b.rank, b.depth] for b in self.lowrank],
        }
        return tensors, spec

    @staticmethod
    def state_shapes(spec: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shape of every tensor :meth:`to_state` writes, from the spec alone (for codecs)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (r0, r1, c0, c1) in enumerate(spec["leaves"]):
            shapes[f"{prefix}leaf.{i}"] = (r1 - r0, c1 - c0)
        for i, (r0, r1, c0, c1, k, _depth) in enumerate(spec["lowrank"]):
            shapes[f"{prefix}p.{i}"] = (r1 - r0, k)
            shapes[f"{prefix}q.{i}"] = (c1 - c0, k)
        return shapes

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], spec: dict, prefix: str = "") -> "HSSMatrix":
        """Inverse of :meth:`to_state`; validates the spec against the tensor shapes."""
        if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
            raise ValueError(f"not an HSS spec (format/version): {spec.get('format')}/{spec.get('version')}")
        leaves = [LeafBlock(*map(int, b)) for b in spec["leaves"]]
        lowrank = [LowRankBlock(*map(int, b)) for b in spec["lowrank"]]
        try:
            dense = [tensors[f"{prefix}leaf.{i}"] for i in range(len(leaves))]
            ps = [tensors[f"{prefix}p.{i}"] for i in range(len(lowrank))]
            qs = [tensors[f"{prefix}q.{i}"] for i in range(len(lowrank))]
        except KeyError as exc:
            raise ValueError(f"missing HSS tensor {exc}") from None
        shape = (int(spec["shape"][0]), int(spec["shape"][1]))
        return cls(shape, int(spec["leaf_size"]), leaves, lowrank, dense, ps, qs)
