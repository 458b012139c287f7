"""Checkpoint codec for :class:`~hasslefree.hss.HSSLinear`.

Tensors written per layer (relative names):

* ``s_values`` (nnz, model dtype), ``s_col`` (nnz) and ``s_crow`` (out + 1): S in CSR form,
  indices in the smallest integer type that holds them (int16 columns up to 32768 inputs);
* ``row_perm`` / ``col_perm``: the permutations, only when they are not the identity
  (``shss`` and ``shss-whitened`` keep the original order and store none);
* ``hss.leaf.i``, ``hss.p.i``, ``hss.q.i``: the dense leaves and thin factors, as they are;
* ``bias`` when the layer has one.

The block layout of the tree (ranges and ranks) goes into the layer's JSON metadata, so
decoding needs no knowledge of how the tree was built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hasslefree.sparse_storage import csr_index_dtypes, dtype_from_name
from hasslefree.checkpoint.registry import ModuleCodec, TensorSpec, register_codec
from hasslefree.hss.layer import HSSLinear
from hasslefree.hss.matrix import HSSMatrix

__all__ = ["HSSLinearCodec", "perm_dtype"]


def perm_dtype(size: int) -> torch.dtype:
    """Smallest signed integer type holding indices ``0 .. size - 1``."""
    return torch.int16 if size <= 2**15 else torch.int32


def _is_identity(perm: Tensor) -> bool:
    return bool(torch.equal(perm.cpu(), torch.arange(perm.numel())))


class HSSLinearCodec(ModuleCodec):
    """Sparse S (compact CSR) + permutations + HSS leaves and factors."""

    kind = "hss_linear"

    def encode(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert isinstance(module, HSSLinear)
        state, spec = module.to_state()
        out_f, in_f = module.out_features, module.in_features
        nnz = int(spec["nnz"])
        col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
        permuted = not (_is_identity(module.row_perm) and _is_identity(module.col_perm))
        tensors = {k: v for k, v in state.items() if k.startswith("hss.") or k in ("s_values", "bias")}
        tensors["s_col"] = state["s_col"].to(col_dtype)
        tensors["s_crow"] = state["s_crow"].to(ptr_dtype)
        if permuted:
            tensors["row_perm"] = state["row_perm"].to(perm_dtype(out_f))
            tensors["col_perm"] = state["col_perm"].to(perm_dtype(in_f))
        meta: dict[str, Any] = {
            "in_features": in_f,
            "out_features": out_f,
            "dtype": spec["dtype"],
            "bias": spec["bias"],
            "nnz": nnz,
            "permuted": permuted,
            "parameters": module.parameter_count(include_bias=False),
            "config": spec["config"],
            "hss": spec["hss"],
        }
        return tensors, meta

    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, TensorSpec]:
        out_f, in_f, nnz = int(meta["out_features"]), int(meta["in_features"]), int(meta["nnz"])
        dtype = dtype_from_name(meta["dtype"])
        col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
        specs: dict[str, TensorSpec] = {
            name: (shape, dtype) for name, shape in HSSMatrix.state_shapes(meta["hss"], prefix="hss.").items()
        }
        specs["s_values"] = ((nnz,), dtype)
        specs["s_col"] = ((nnz,), col_dtype)
        specs["s_crow"] = ((out_f + 1,), ptr_dtype)
        if meta.get("permuted"):
            specs["row_perm"] = ((out_f,), perm_dtype(out_f))
            specs["col_perm"] = ((in_f,), perm_dtype(in_f))
        if meta.get("bias"):
            specs["bias"] = ((out_f,), dtype)
        return specs

    def decode(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> nn.Module:
        out_f, in_f = int(meta["out_features"]), int(meta["in_features"])
        state = dict(tensors)
        state["s_col"] = tensors["s_col"].to(torch.int64)
        state["s_crow"] = tensors["s_crow"].to(torch.int64)
        _check_csr(state["s_crow"], state["s_col"], out_f, in_f)
        device = tensors["s_values"].device
        for name, size in (("row_perm", out_f), ("col_perm", in_f)):
            state[name] = (tensors[name].to(torch.int64) if meta.get("permuted")
                           else torch.arange(size, device=device))
        spec = {
            "in_features": in_f,
            "out_features": out_f,
            "dtype": meta["dtype"],
            "nnz": int(meta["nnz"]),
            "bias": bool(meta.get("bias")),
            "config": meta.get("config") or {},
            "hss": meta["hss"],
        }
        return HSSLinear.from_state(state, spec)  # raises ValueError on a bad tree or permutation

    def analytic_bytes(self, meta: dict[str, Any]) -> float:
        """Values x value bytes + CSR indices + permutations (when stored) + bias."""
        out_f, in_f, nnz = int(meta["out_features"]), int(meta["in_features"]), int(meta["nnz"])
        value = dtype_from_name(meta["dtype"]).itemsize
        col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
        hss_values = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in meta["hss"]["leaves"])
        hss_values += sum(k * ((r1 - r0) + (c1 - c0)) for r0, r1, c0, c1, k, _ in meta["hss"]["lowrank"])
        total = (nnz + hss_values) * value + nnz * col_dtype.itemsize + (out_f + 1) * ptr_dtype.itemsize
        if meta.get("permuted"):
            total += out_f * perm_dtype(out_f).itemsize + in_f * perm_dtype(in_f).itemsize
        if meta.get("bias"):
            total += out_f * value
        return total

    def summary(self, meta: dict[str, Any]) -> dict[str, Any]:
        config = meta.get("config") or {}
        sparsity = config.get("sparsity")
        pattern = config.get("variant", "hss")
        if sparsity is not None:
            pattern += f" s={sparsity:g}"
        if config.get("leaf") is not None:
            pattern += f" leaf={config['leaf']}"
        return {"pattern": pattern, "rank": config.get("outer_rank", "-")}


def _check_csr(crow: Tensor, col: Tensor, out_f: int, in_f: int) -> None:
    """Reject corrupted index data before it reaches a sparse kernel."""
    nnz = col.numel()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow.diff() < 0).any()):
        raise ValueError("corrupted CSR row pointers of S")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= in_f):
        raise ValueError("corrupted CSR column indices of S: out of range")


register_codec(HSSLinear, HSSLinearCodec())
