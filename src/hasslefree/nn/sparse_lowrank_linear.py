"""The compressed replacement for ``nn.Linear``: a sparse weight plus a low-rank term.

The sparse part is kept in dense storage (zeros off the pattern) because that is
simple and exact; a real sparse kernel can replace ``forward`` later without
changing the parameters or the checkpoint format.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["SparseLowRankLinear", "replace_linear"]


class SparseLowRankLinear(nn.Module):
    """``y = x W_Sᵀ + (x V) Uᵀ + b`` with W_S (out × in), U (out × r), V (in × r).

    ``pattern`` ("2:4", "unstructured", "dense", …) and ``rank`` are metadata that
    the checkpoint codec uses to pick a compact encoding of ``sparse_weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        pattern: str = "unstructured",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 0 or out_features < 0 or rank < 0:
            raise ValueError(f"dimensions must be non-negative, got in={in_features}, out={out_features}, rank={rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.pattern = pattern
        self.sparse_weight = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        self.U = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.V = nn.Parameter(torch.zeros(in_features, rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear_parts(
        cls,
        sparse: Tensor,
        U: Tensor | None,
        V: Tensor | None,
        bias: Tensor | None = None,
        pattern: str = "unstructured",
    ) -> SparseLowRankLinear:
        """Wrap solver outputs; ``U``/``V`` may be ``None`` for a purely sparse layer.

        Zeros of ``sparse`` are normalised to +0.0: a compact encoding stores no sign
        for dropped entries, so this keeps save → load bit-exact.
        """
        if sparse.dim() != 2:
            raise ValueError(f"sparse weight must be 2-D (out, in), got shape {tuple(sparse.shape)}")
        out_f, in_f = sparse.shape
        dtype, device = sparse.dtype, sparse.device
        if U is None or V is None:
            if U is not None or V is not None:
                raise ValueError("U and V must both be given or both be None")
            U = sparse.new_zeros(out_f, 0)
            V = sparse.new_zeros(in_f, 0)
        if U.dim() != 2 or V.dim() != 2 or U.shape[0] != out_f or V.shape[0] != in_f or U.shape[1] != V.shape[1]:
            raise ValueError(
                f"shape mismatch: sparse {tuple(sparse.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)};"
                " expected U (out, r) and V (in, r)"
            )
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        module = cls(in_f, out_f, U.shape[1], bias=bias is not None, pattern=pattern, device="meta", dtype=dtype)
        with torch.no_grad():
            clean = torch.where(sparse == 0, torch.zeros((), dtype=dtype, device=device), sparse)
            module.sparse_weight = nn.Parameter(clean.contiguous())
            module.U = nn.Parameter(U.detach().to(device=device, dtype=dtype).contiguous())
            module.V = nn.Parameter(V.detach().to(device=device, dtype=dtype).contiguous())
            if bias is not None:
                module.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).contiguous())
        return module

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.sparse_weight, self.bias)
        if self.rank > 0:
            y = y + F.linear(F.linear(x, self.V.t()), self.U)
        return y

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """Merged ``W_S + U Vᵀ`` (out × in), summed in float32 at least to limit rounding."""
        acc = torch.promote_types(self.sparse_weight.dtype, torch.float32)
        dense = self.sparse_weight.to(acc)
        if self.rank > 0:
            dense = dense + self.U.to(acc) @ self.V.to(acc).t()
        return dense.to(self.sparse_weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, pattern={self.pattern!r}, bias={self.bias is not None}"
        )


def replace_linear(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Swap the submodule at ``qualified_name`` (e.g. "model.layers.0.mlp.up_proj"); return the old one."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise AttributeError(f"{type(parent).__name__} at {parent_name or '<root>'!r} has no submodule {child!r}")
    old = getattr(parent, child)
    setattr(parent, child, new_module)
    logger.debug("replaced %s (%s) with %s", qualified_name, type(old).__name__, type(new_module).__name__)
    return old
