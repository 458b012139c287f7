"""Rank rule, exact parameter counts and the outer rank that meets a parameter budget.

Everything here is integer arithmetic on shapes: no tensors, so a benchmark can size a
layer before touching its weights, and the tests can check the stored tree against
numbers derived independently of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "RankRule",
    "sparse_count",
    "hss_parameter_count",
    "hss_parameter_count_pow2",
    "total_parameter_count",
    "outer_rank_for_budget",
]


@dataclass(frozen=True)
class RankRule:
    """Rank of an off-diagonal block as a function of its depth in the tree.

    ``rank = min(outer, max(min_rank, floor(outer * decay**depth)), rows, cols)``.
    Deeper blocks are smaller and sit closer to the diagonal, where most of the
    residual's energy lives in the dense leaves, so they get less rank. The floor keeps
    deep blocks useful; clamping by ``outer`` keeps the count monotone in ``outer``
    (needed for bisection) and makes ``outer = 0`` mean "no low-rank blocks at all".
    """

    decay: float = 0.5
    min_rank: int = 16

    def __post_init__(self) -> None:
        if not (0.0 < self.decay <= 1.0):
            raise ValueError(f"rank decay must be in (0, 1], got {self.decay}")
        if self.min_rank < 0:
            raise ValueError(f"min_rank must be >= 0, got {self.min_rank}")

    def rank(self, outer: int, depth: int, rows: int, cols: int) -> int:
        """Rank used for a ``rows x cols`` off-diagonal block at ``depth`` (root = 0)."""
        shrunk = math.floor(outer * self.decay**depth + 1e-9)
        return max(0, min(outer, max(self.min_rank, shrunk), rows, cols))

    def to_spec(self) -> dict:
        return {"decay": self.decay, "min_rank": self.min_rank}


def sparse_count(numel: int, sparsity: float) -> int:
    """Exact number of weights moved into S: ``floor(sparsity * numel)``.

    The small epsilon stops 0.3 * 100 = 29.999... from losing an entry.
    """
    return int(math.floor(sparsity * numel + 1e-9))


def is_leaf(rows: int, cols: int, leaf: int) -> bool:
    """A diagonal block is stored dense once both sides fit in ``leaf`` (or it cannot split)."""
    return max(rows, cols) <= leaf or min(rows, cols) < 2


def hss_parameter_count(
    shape: tuple[int, int], outer_rank: int, leaf: int, rule: RankRule | None = None
) -> int:
    """Stored HSS parameters of a ``shape`` matrix, from shapes alone.

    Halving ``m`` rows gives ``m // 2`` and ``m - m // 2``, so one depth holds at most two
    distinct block sizes per side: memoising on ``(rows, cols, depth)`` makes this
    O(depth) work even for huge layers.
    """
    rule = rule or RankRule()
    if leaf < 1:
        raise ValueError(f"leaf must be >= 1, got {leaf}")

    @lru_cache(maxsize=None)
    def count(rows: int, cols: int, depth: int) -> int:
        if is_leaf(rows, cols, leaf):
            return rows * cols
        top, left = rows // 2, cols // 2
        bottom, right = rows - top, cols - left
        k12 = rule.rank(outer_rank, depth, top, right)
        k21 = rule.rank(outer_rank, depth, bottom, left)
        return (
            count(top, left, depth + 1)
            + count(bottom, right, depth + 1)
            + k12 * (top + right)
            + k21 * (bottom + left)
        )

    return count(int(shape[0]), int(shape[1]), 0)


def hss_parameter_count_pow2(n: int, outer_rank: int, leaf: int, rule: RankRule | None = None) -> int:
    """Closed form for a square ``n = leaf * 2**L`` matrix: ``n*leaf + sum_d 2*n*k_d``.

    At depth d there are 2**d nodes, each with two (n/2**(d+1))-square off-diagonal blocks
    of rank k_d, i.e. 2 * n * k_d parameters per depth; the 2**L leaves hold n * leaf.
    """
    rule = rule or RankRule()
    levels = round(math.log2(n / leaf))
    if leaf * 2**levels != n:
        raise ValueError(f"n={n} is not leaf * 2**L for leaf={leaf}")
    total = n * leaf
    for d in range(levels):
        side = n >> (d + 1)
        total += 2 * n * rule.rank(outer_rank, d, side, side)
    return total


def total_parameter_count(
    shape: tuple[int, int], sparsity: float, outer_rank: int, leaf: int, rule: RankRule | None = None
) -> int:
    """Nonzeros of S plus HSS parameters (bias excluded)."""
    return sparse_count(shape[0] * shape[1], sparsity) + hss_parameter_count(shape, outer_rank, leaf, rule)


def outer_rank_for_budget(
    shape: tuple[int, int],
    sparsity: float,
    budget_params: int,
    leaf: int,
    rule: RankRule | None = None,
) -> int:
    """Largest outer rank whose exact count (S nonzeros + HSS) stays within ``budget_params``.

    The count is non-decreasing in the outer rank (see :class:`RankRule`), so bisection on
    the exact count finds it; ranks beyond ``min(shape)`` change nothing. Raises
    ValueError when even outer rank 0 (S plus dense leaves) is over budget.
    """
    rule = rule or RankRule()
    if budget_params < 0:
        raise ValueError(f"budget_params must be >= 0, got {budget_params}")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    shape = (int(shape[0]), int(shape[1]))

    def fits(r: int) -> bool:
        return total_parameter_count(shape, sparsity, r, leaf, rule) <= budget_params

    if not fits(0):
        floor = total_parameter_count(shape, sparsity, 0, leaf, rule)
        raise ValueError(
            f"budget {budget_params} is below the minimum {floor} for shape {shape}, "
            f"sparsity {sparsity}, leaf {leaf} (S plus dense leaves); lower sparsity or leaf"
        )
    lo, hi = 0, max(1, min(shape))
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
