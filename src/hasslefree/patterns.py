"""Sparsity patterns: which entries of a weight (out x in) a sparse part may keep.

Convention: ``N:M`` keeps N of every M consecutive weights along the input dimension, per
output row (the paper's convention; SparseGPT/Wanda count the pruned ones instead).
Every pruner chooses its support through :meth:`SparsityPattern.mask_from_scores`, so the
pattern logic lives in exactly one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED = re.compile(r"^\s*(unstructured|row)\s*[:@]?\s*([0-9.]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """A sparsity constraint set C_S.

    kind:
      ``"nm"``: keep ``n`` of every ``m`` consecutive inputs in each row.
      ``"unstructured"``: keep ``density`` of the whole layer (or exactly ``nonzeros``).
      ``"row"``: keep ``density`` of every output row.
      ``"dense"``: keep everything (useful to check a pipeline is lossless).
    """

    kind: str
    n: int = 0
    m: int = 0
    density: float = 1.0
    nonzeros: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in {"nm", "unstructured", "row", "dense"}:
            raise ValueError(f"unknown sparsity pattern kind {self.kind!r}")
        if self.kind == "nm":
            if self.m < 1 or self.n < 0:
                raise ValueError(f"N:M pattern needs N >= 0 and M >= 1, got {self.n}:{self.m}")
            if self.n >= self.m:
                raise ValueError(
                    f"N:M pattern {self.n}:{self.m} keeps N={self.n} of M={self.m}: "
                    "N must be smaller than M (N:M means keep N of every M)"
                )
        if self.kind in {"unstructured", "row"} and not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {self.density}")
        if self.nonzeros is not None and self.nonzeros < 0:
            raise ValueError(f"nonzeros must be >= 0, got {self.nonzeros}")

    # ----------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, spec: "str | SparsityPattern") -> "SparsityPattern":
        """Parse ``"2:4"``, ``"unstructured:0.5"`` (keep 50 %), ``"row:0.3"``, ``"dense"``."""
        if isinstance(spec, SparsityPattern):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"pattern must be a string like '2:4' or 'unstructured:0.5', got {spec!r}")
        if spec.strip().lower() == "dense":
            return cls("dense")
        match = _NM.match(spec)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            return cls("nm", n=n, m=m, density=n / m if m else 0.0)
        match = _UNSTRUCTURED.match(spec.lower())
        if match:
            value = float(match.group(2)) / (100.0 if match.group(3) else 1.0)
            return cls(match.group(1), density=value)
        raise ValueError(
            f"cannot parse sparsity pattern {spec!r}: use 'N:M' (keep N of every M), "
            "'unstructured:D' or 'row:D' (keep a fraction D), or 'dense'"
        )

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "dense":
            return "dense"
        if self.nonzeros is not None:
            return f"{self.kind}@{self.nonzeros}"
        return f"{self.kind}:{self.density:g}"

    def with_nonzeros(self, nonzeros: int) -> "SparsityPattern":
        """Unstructured pattern with an exact per-layer budget (the κ rank policy needs it)."""
        return SparsityPattern("unstructured", density=self.density, nonzeros=int(nonzeros))

    # ----------------------------------------------------------------- checks
    def validate_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        """Raise a ValueError naming the layer when the pattern cannot fit its width."""
        if self.kind == "nm" and in_features % self.m != 0:
            raise ValueError(
                f"{name}: input width {in_features} is not divisible by M={self.m} of pattern {self}"
            )
        if self.nonzeros is not None and self.nonzeros > out_features * in_features:
            raise ValueError(
                f"{name}: {self.nonzeros} nonzeros requested but the layer has only "
                f"{out_features * in_features} weights"
            )

    def kept_count(self, out_features: int, in_features: int) -> int:
        """Number of entries the pattern keeps for a layer of this shape."""
        if self.kind == "dense":
            return out_features * in_features
        if self.kind == "nm":
            return out_features * (in_features // self.m) * self.n
        if self.kind == "row":
            return out_features * self.row_budget(in_features)
        if self.nonzeros is not None:
            return self.nonzeros
        return int(round(self.density * out_features * in_features))

    def row_budget(self, in_features: int) -> int:
        return int(round(self.density * in_features))

    # ----------------------------------------------------------------- masks
    def mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask keeping, within the pattern, the entries with the largest score.

        ``scores`` is (rows, cols); for N:M, cols must be a multiple of M. Ties break
        towards the lower index (``topk`` on CPU/GPU is deterministic for our use).
        """
        rows, cols = scores.shape
        if self.kind == "dense":
            return torch.ones_like(scores, dtype=torch.bool)
        if self.kind == "nm":
            groups = scores.reshape(rows, cols // self.m, self.m)
            mask = torch.zeros_like(groups, dtype=torch.bool)
            if self.n > 0:
                mask.scatter_(2, groups.topk(self.n, dim=2).indices, True)
            return mask.reshape(rows, cols)
        if self.kind == "row":
            return topk_mask(scores, self.row_budget(cols), dim=1)
        keep = self.kept_count(rows, cols)
        return topk_mask(scores.reshape(1, -1), keep, dim=1).reshape(rows, cols)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Euclidean projection onto the pattern: keep the largest |w| (magnitude pruning)."""
        return weight * self.mask_from_scores(weight.abs())

    def is_satisfied_by(self, mask: torch.Tensor) -> bool:
        """Whether a boolean support obeys the pattern (at most the budget, for every group)."""
        rows, cols = mask.shape
        if self.kind == "dense":
            return True
        if self.kind == "nm":
            return bool((mask.reshape(rows, cols // self.m, self.m).sum(-1) <= self.n).all())
        if self.kind == "row":
            return bool((mask.sum(1) <= self.row_budget(cols)).all())
        return int(mask.sum()) <= self.kept_count(rows, cols)


def topk_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = max(0, min(k, scores.shape[dim]))
    if k > 0:
        mask.scatter_(dim, scores.topk(k, dim=dim).indices, True)
    return mask

