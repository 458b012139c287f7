"""Rank policies (paper §5, App. A.3): how large the low-rank part of each layer may be."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hasslefree.patterns import SparsityPattern


@dataclass(frozen=True)
class RankPolicy:
    """``fixed`` rank r; ``ratio`` ρ for N:M (total kept ≤ (1 − ρ)·d_out·d_in);
    ``kappa`` κ for unstructured with compression ρ (κ of the budget goes to U, V)."""

    kind: str
    rank: int = 0
    rho: float = 0.0
    kappa: float = 0.0

    @classmethod
    def fixed(cls, rank: int) -> "RankPolicy":
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return cls("fixed", rank=rank)

    @classmethod
    def compression(cls, rho: float) -> "RankPolicy":
        if not 0.0 < rho < 1.0:
            raise ValueError(f"compression ratio rho must lie in (0, 1), got {rho}")
        return cls("ratio", rho=rho)

    @classmethod
    def rank_ratio(cls, kappa: float, rho: float) -> "RankPolicy":
        if not 0.0 <= kappa < 1.0 or not 0.0 < rho < 1.0:
            raise ValueError(f"need 0 <= kappa < 1 and 0 < rho < 1, got kappa={kappa}, rho={rho}")
        return cls("kappa", rho=rho, kappa=kappa)

    def resolve(self, pattern: SparsityPattern, out_features: int,
                in_features: int) -> tuple[int, SparsityPattern]:
        """The rank for this layer, and the pattern (κ fixes the unstructured nonzeros)."""
        area = out_features * in_features
        perimeter = out_features + in_features
        if self.kind == "fixed":
            return self.rank, pattern
        if self.kind == "ratio":
            if pattern.kind != "nm":
                raise ValueError("the compression-ratio rank policy (rho) needs an N:M pattern; "
                                 "use rank_ratio (kappa) for unstructured sparsity")
            rank = math.floor((1.0 - self.rho - pattern.n / pattern.m) * area / perimeter)
            if rank < 0:
                raise ValueError(f"pattern {pattern} alone keeps more than 1 - rho = {1 - self.rho:g}")
            return rank, pattern
        rank = math.floor(self.kappa * (1.0 - self.rho) * area / perimeter)
        nonzeros = math.floor((1.0 - self.kappa) * (1.0 - self.rho) * area)
        return rank, SparsityPattern("unstructured", density=nonzeros / area, nonzeros=nonzeros)


def parameter_count(pattern: SparsityPattern, rank: int, out_features: int,
                    in_features: int) -> int:
    """Stored parameters: kept sparse values + U (out x r) + V (in x r)."""
    return pattern.kept_count(out_features, in_features) + rank * (out_features + in_features)
