"""Checkpoint codec for :class:`~hasslefree.nn.SparseLowRankLinear`.

Tensors written per layer (relative names): ``sparse.*`` from
:mod:`hasslefree.checkpoint.encoding`, then ``U``, ``V`` and ``bias`` as they are.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hasslefree.checkpoint.encoding import (
    decode_sparse,
    dtype_from_name,
    dtype_name,
    encode_sparse,
    parse_pattern,
    sparse_analytic_bytes,
    sparse_tensor_specs,
)
from hasslefree.checkpoint.registry import ModuleCodec, TensorSpec, register_codec
from hasslefree.nn import SparseLowRankLinear

__all__ = ["SparseLowRankLinearCodec"]

_SPARSE = "sparse."


class SparseLowRankLinearCodec(ModuleCodec):
    """Pattern-aware encoding of W_S; U, V and bias stored verbatim."""

    kind = "sparse_lowrank_linear"

    def encode(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert isinstance(module, SparseLowRankLinear)
        sparse = encode_sparse(module.sparse_weight, module.pattern)
        tensors = {_SPARSE + k: v for k, v in sparse.items()}
        tensors["U"] = module.U.detach().contiguous()
        tensors["V"] = module.V.detach().contiguous()
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().contiguous()
        meta: dict[str, Any] = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "pattern": str(parse_pattern(module.pattern)),
            "rank": module.rank,
            "bias": module.bias is not None,
            "dtype": dtype_name(module.sparse_weight.dtype),
            "nnz": int((module.sparse_weight != 0).sum()),
        }
        return tensors, meta

    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, TensorSpec]:
        out_f, in_f, rank = int(meta["out_features"]), int(meta["in_features"]), int(meta["rank"])
        dtype = dtype_from_name(meta["dtype"])
        specs = {
            _SPARSE + k: v
            for k, v in sparse_tensor_specs(meta["pattern"], (out_f, in_f), dtype, meta.get("nnz")).items()
        }
        specs["U"] = ((out_f, rank), dtype)
        specs["V"] = ((in_f, rank), dtype)
        if meta.get("bias"):
            specs["bias"] = ((out_f,), dtype)
        return specs

    def decode(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> nn.Module:
        shape = (int(meta["out_features"]), int(meta["in_features"]))
        sparse_parts = {k[len(_SPARSE) :]: v for k, v in tensors.items() if k.startswith(_SPARSE)}
        sparse = decode_sparse(sparse_parts, meta["pattern"], shape)
        bias = tensors.get("bias")
        # Built directly (not via from_linear_parts) so every decoded bit is kept as stored.
        module = SparseLowRankLinear(
            shape[1],
            shape[0],
            int(meta["rank"]),
            bias=bias is not None,
            pattern=meta["pattern"],
            device="meta",
            dtype=sparse.dtype,
        )
        module.sparse_weight = nn.Parameter(sparse)
        module.U = nn.Parameter(tensors["U"].contiguous())
        module.V = nn.Parameter(tensors["V"].contiguous())
        if bias is not None:
            module.bias = nn.Parameter(bias.contiguous())
        return module

    def analytic_bytes(self, meta: dict[str, Any]) -> float:
        out_f, in_f, rank = int(meta["out_features"]), int(meta["in_features"]), int(meta["rank"])
        value_bytes = dtype_from_name(meta["dtype"]).itemsize
        total = sparse_analytic_bytes(meta["pattern"], (out_f, in_f), value_bytes, meta.get("nnz"))
        total += (out_f + in_f) * rank * value_bytes
        if meta.get("bias"):
            total += out_f * value_bytes
        return total


register_codec(SparseLowRankLinear, SparseLowRankLinearCodec())
