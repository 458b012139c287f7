"""Checkpoint codec for :class:`~hasslefree.nn.SparseLowRankLinear`.

Tensors written per layer (relative names): ``sparse.*`` from
:mod:`hasslefree.sparse_storage`, then ``U``, ``V`` and ``bias`` as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from hasslefree.sparse_storage import (
    csr_rows_and_columns,
    decode_sparse,
    dtype_from_name,
    dtype_name,
    encode_sparse,
    parse_layout,
    sparse_analytic_bytes,
    sparse_tensor_specs,
)
from hasslefree.checkpoint.registry import ModuleCodec, TensorSpec, register_codec
from hasslefree.nn import PackedSparseLowRankLinear, SparseLowRankLinear

__all__ = ["SparseLowRankLinearCodec", "packed_from_encoded"]

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
            "pattern": str(parse_layout(module.pattern)),
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


def packed_from_encoded(tensors: dict[str, Tensor], meta: dict[str, Any], *,
                        name: str | None = None) -> PackedSparseLowRankLinear:
    """Build from a checkpoint's tensors (names relative to the layer: ``sparse.*``, ``U``,
    ``V``, ``bias``) and its ``sparse_lowrank_linear`` metadata, without densifying N:M
    layers. Anything corrupt or inconsistent raises a ValueError naming the layer."""
    where = f"layer {name!r}: " if name else ""
    try:
        out_f, in_f = int(meta["out_features"]), int(meta["in_features"])
        p = parse_layout(meta["pattern"])
        want_dtype = dtype_from_name(meta["dtype"])
        sparse = {k[len(_SPARSE):]: v for k, v in tensors.items() if k.startswith(_SPARSE)}
        U, V, bias = tensors["U"], tensors["V"], tensors.get("bias")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}missing or invalid field: {exc}") from None
    if bool(meta.get("bias")) != (bias is not None):
        raise ValueError(f"{where}metadata says bias={meta.get('bias')} but the tensors "
                         f"{'lack' if bias is None else 'include'} one")
    if U.dim() != 2 or int(meta.get("rank", U.shape[1])) != U.shape[1]:
        raise ValueError(f"{where}metadata rank {meta.get('rank')} does not match U {list(U.shape)}")
    values = sparse.get("values")
    if values is None or values.dtype != want_dtype:
        got = "missing" if values is None else str(values.dtype)
        raise ValueError(f"{where}sparse values must be {want_dtype}, got {got}")
    if p.kind == "nm":
        packed = sparse
    elif p.kind == "unstructured":
        try:
            packed = {"mask": _csr_to_mask(sparse, out_f, in_f), "values": values}
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}{exc}") from None
    else:
        packed = sparse
    return PackedSparseLowRankLinear(in_f, out_f, str(p), packed, U, V, bias, name=name)


def _csr_to_mask(sparse: dict[str, Tensor], out_f: int, in_f: int) -> Tensor:
    """A checkpoint's CSR (``values``, ``col_indices``, ``row_ptr``) as the packed bitmask.

    CSR values are already in row-major order, so only the mask is built; the checks are
    those of the codec's decoder (pointers consistent, columns in range and increasing)."""
    values, cols, row_ptr = sparse["values"], sparse["col_indices"], sparse["row_ptr"]
    if cols.dtype.is_floating_point or row_ptr.dtype.is_floating_point:
        raise ValueError("CSR col_indices and row_ptr must be integer tensors")
    nnz = values.numel()
    if values.dim() != 1 or tuple(cols.shape) != (nnz,) or tuple(row_ptr.shape) != (out_f + 1,):
        raise ValueError(f"CSR shapes do not fit a {out_f}x{in_f} layer with {nnz} values: "
                         f"col_indices {list(cols.shape)}, row_ptr {list(row_ptr.shape)}")
    rows, cols = csr_rows_and_columns(cols, row_ptr, nnz, (out_f, in_f))
    per_row = math.ceil(in_f / 8)
    byte = rows * per_row + cols // 8
    bit = torch.ones((), dtype=torch.uint8, device=cols.device) << (cols % 8).to(torch.uint8)
    mask = torch.zeros(out_f * per_row, dtype=torch.uint8, device=cols.device)
    mask.index_put_((byte,), bit, accumulate=True)  # distinct bits per byte: the sum is the OR
    return mask.view(out_f, per_row)
