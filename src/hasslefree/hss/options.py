"""``HSSOptions``: the run-wide settings of sparse + HSS layers, validated when built.

One frozen, hashable dataclass with a JSON round trip, so the pipeline can check every
option before any work, group layers by settings, and record the options in reports and
resume hashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .budget import RankRule, outer_rank_for_budget, sparse_count, total_parameter_count
from .construct import DATA_AWARE_VARIANTS, VARIANTS
from .layer import DEFAULT_OUTER_RANK, _is_int

__all__ = ["HSSOptions", "is_hss_method", "HSS_METHODS"]

HSS_METHODS = VARIANTS


def is_hss_method(name: str) -> bool:
    """Whether ``name`` is a sparse + HSS variant rather than a sparse + low-rank preset."""
    return name in HSS_METHODS


@dataclass(frozen=True)
class HSSOptions:
    """How every HSS layer is built (see :func:`hasslefree.hss.compress_linear_hss`).

    ``budget`` is the stored parameters per layer (nonzeros of S + HSS values, bias
    excluded) as a fraction of the dense layer's; it picks the largest outer rank that fits
    and excludes ``outer_rank``. Neither given: outer rank 512.
    """

    sparsity: float = 0.3
    outer_rank: int | None = None
    leaf: int = 256
    min_rank: int = 16
    rank_decay: float = 0.5
    budget: float | None = None
    sweeps: int = 1

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
            raise ValueError(f"HSS sparsity must be in [0, 1), got {s!r}")
        if self.outer_rank is not None and (not _is_int(self.outer_rank) or self.outer_rank < 0):
            raise ValueError(f"HSS outer rank must be an integer >= 0, got {self.outer_rank!r}")
        if not _is_int(self.leaf) or self.leaf < 1:
            raise ValueError(f"HSS leaf must be an integer >= 1, got {self.leaf!r}")
        if not _is_int(self.min_rank) or self.min_rank < 0:
            raise ValueError(f"HSS min_rank must be an integer >= 0, got {self.min_rank!r}")
        d = self.rank_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"HSS rank_decay must be in (0, 1], got {d!r}")
        if not _is_int(self.sweeps) or self.sweeps < 0:
            raise ValueError(f"HSS sweeps must be an integer >= 0, got {self.sweeps!r}")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b) or not 0.0 < b <= 1.0:
                raise ValueError(f"HSS budget is a fraction of the dense parameters in (0, 1], got {b!r}")
            if self.outer_rank is not None:
                raise ValueError("give either an HSS outer rank or an HSS budget, not both")
        for name in ("outer_rank", "leaf", "min_rank", "sweeps"):  # numpy ints -> int, for JSON and hashing
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
        object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "rank_decay", float(self.rank_decay))

    @classmethod
    def from_value(cls, value: "HSSOptions | Mapping[str, Any] | None") -> "HSSOptions":
        """Accept an instance, a mapping of field names (unknown keys rejected) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"HSS options must be HSSOptions or a mapping, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown HSS option(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(known))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rule(self) -> RankRule:
        return RankRule(decay=self.rank_decay, min_rank=self.min_rank)

    def budget_params(self, shape: tuple[int, int]) -> int | None:
        """The per-layer parameter budget, or None when the outer rank is given."""
        if self.budget is None:
            return None
        return int(math.floor(self.budget * shape[0] * shape[1] + 1e-9))

    def outer_rank_for(self, shape: tuple[int, int]) -> int:
        """Outer rank of a layer of this shape; ValueError when the budget cannot be met."""
        budget = self.budget_params(shape)
        if budget is None:
            return DEFAULT_OUTER_RANK if self.outer_rank is None else self.outer_rank
        return outer_rank_for_budget(shape, self.sparsity, budget, self.leaf, self.rule)

    def parameter_count(self, shape: tuple[int, int]) -> int:
        """Stored values of one layer (S nonzeros + HSS), from the shape alone."""
        return total_parameter_count(shape, self.sparsity, self.outer_rank_for(shape), self.leaf, self.rule)

    def sparse_count(self, shape: tuple[int, int]) -> int:
        return sparse_count(shape[0] * shape[1], self.sparsity)

    def describe(self, variant: str) -> str:
        size = f"budget {self.budget:g}" if self.budget is not None else \
            f"outer rank {DEFAULT_OUTER_RANK if self.outer_rank is None else self.outer_rank}"
        extra = f", sweeps {self.sweeps}" if variant in DATA_AWARE_VARIANTS else ""
        return f"{variant}: sparsity {self.sparsity:g}, {size}, leaf {self.leaf}{extra}"
