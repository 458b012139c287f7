"""Compact, exact tensor encodings for sparse weight matrices.

* ``N:M`` (keep N of every M consecutive inputs, per output row): the kept values
  at full model precision plus, per kept value, its position inside its group at
  ``ceil(log2 M)`` bits, bit-packed into ``uint8``. A trailing partial group is
  zero-padded. Groups with fewer than N nonzeros store zero fillers, so any
  matrix that satisfies the pattern round-trips.
* ``unstructured``: CSR (values, column indices in int16 when the width allows,
  int32 otherwise, row pointers in int32/int64).
* ``dense``: the matrix itself.

Decoding reproduces the encoded matrix bit for bit, except that a dropped
(zero) entry always decodes as +0.0.

A :class:`StorageLayout` says how a sparse part is stored; which entries a solver may keep
is the separate :class:`hasslefree.patterns.SparsityPattern` (its ``unstructured:D`` and
``row:D`` constraints are both stored as ``unstructured`` CSR). Both the checkpoint format
and the packed run-time modules build on this module, which depends on neither.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "StorageLayout",
    "parse_layout",
    "index_bits",
    "dtype_name",
    "dtype_from_name",
    "pack_bits",
    "unpack_bits",
    "encode_sparse",
    "decode_sparse",
    "sparse_tensor_specs",
    "sparse_analytic_bytes",
]

TensorSpec = tuple[tuple[int, ...], torch.dtype]
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class StorageLayout:
    """How a sparse part is stored: kind "nm" (with n, m), "unstructured" (CSR) or "dense"."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_layout(pattern: str) -> StorageLayout:
    """Parse "2:4" / "unstructured" / "dense"; reject anything else early."""
    match = _NM_RE.match(pattern)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m or m > 65536:
            raise ValueError(f"invalid N:M pattern {pattern!r}: need 1 <= N < M <= 65536")
        return StorageLayout("nm", n, m)
    name = pattern.strip().lower()
    if name in ("unstructured", "dense"):
        return StorageLayout(name)
    raise ValueError(f"unknown sparsity pattern {pattern!r}; expected 'N:M', 'unstructured' or 'dense'")


def dtype_name(dtype: torch.dtype) -> str:
    """Map "torch.bfloat16" -> "bfloat16" (the JSON spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; rejects names that are not torch dtypes."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def index_bits(m: int) -> int:
    """Bits needed for a position inside a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def csr_index_dtypes(in_features: int, nnz: int) -> tuple[torch.dtype, torch.dtype]:
    """Smallest (column, row-pointer) integer dtypes for a CSR of this width and size."""
    col = torch.int16 if in_features <= 2**15 else torch.int32
    ptr = torch.int32 if nnz < 2**31 else torch.int64
    return col, ptr


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints < 2**bits into a little-endian bit stream of uint8."""
    codes = codes.reshape(-1)
    if 8 % bits == 0:  # fast path (1, 2, 4, 8 bits): whole codes per byte, same layout
        per = 8 // bits
        c = F.pad(codes.to(torch.uint8), (0, (-codes.numel()) % per)).view(-1, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (c << shifts).sum(dim=1, dtype=torch.uint8)
    work = torch.uint8 if bits <= 8 else torch.int32
    codes = codes.to(work)
    shifts = torch.arange(bits, dtype=work, device=codes.device)
    stream = ((codes[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = F.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``count`` int64 codes."""
    need = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(
            f"packed indices must be a 1-D uint8 tensor of {need} bytes, got {packed.dtype} {tuple(packed.shape)}"
        )
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].to(torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.view(count, bits).to(torch.int64) * weights).sum(dim=1)


def _encode_nm(w: Tensor, n: int, m: int) -> dict[str, Tensor]:
    out_f, in_f = w.shape
    groups = math.ceil(in_f / m)
    padded = F.pad(w, (0, groups * m - in_f)) if groups * m != in_f else w
    g = padded.reshape(out_f, groups, m)
    nonzero = g != 0
    count = nonzero.sum(dim=-1, keepdim=True, dtype=torch.int32)
    too_many = int((count > n).sum())
    if too_many:
        raise ValueError(f"{too_many} groups of {m} hold more than {n} nonzeros: not a {n}:{m} matrix")
    # Every nonzero, plus the first (n - count) zeros of its group as fillers: exactly n per group.
    keep = nonzero | ((~nonzero).cumsum(dim=-1, dtype=torch.int32) <= n - count)
    pos = keep.view(-1, m).nonzero()[:, 1]  # row-major, so ascending within each group
    values = g[keep].reshape(out_f, groups * n)
    return {"values": values.contiguous(), "indices": pack_bits(pos, index_bits(m))}


def _decode_nm(t: dict[str, Tensor], n: int, m: int, shape: tuple[int, int]) -> Tensor:
    out_f, in_f = shape
    groups = math.ceil(in_f / m)
    values = t["values"]
    pos = unpack_bits(t["indices"], index_bits(m), out_f * groups * n).view(out_f, groups, n)
    if pos.numel() and (int(pos.max()) >= m or (n > 1 and not bool((pos[..., 1:] > pos[..., :-1]).all()))):
        raise ValueError(f"corrupted {n}:{m} indices: positions out of range or not strictly increasing")
    dense = torch.zeros(out_f, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(out_f, groups, n))
    return dense.view(out_f, groups * m)[:, :in_f].contiguous()


def _encode_csr(w: Tensor) -> dict[str, Tensor]:
    out_f, in_f = w.shape
    nonzero = w != 0
    rows, cols = nonzero.nonzero(as_tuple=True)
    nnz = rows.numel()
    col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = nonzero.sum(dim=1).cumsum(0)
    return {
        "values": w[rows, cols].contiguous(),
        "col_indices": cols.to(col_dtype),
        "row_ptr": row_ptr.to(ptr_dtype),
    }


def csr_rows_and_columns(cols: Tensor, row_ptr: Tensor, nnz: int, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(row, column) int64 of every stored CSR value, after checking that the pointers are
    consistent and the columns in range and strictly increasing within each row."""
    out_f, in_f = shape
    cols, row_ptr = cols.to(torch.int64), row_ptr.to(torch.int64)
    counts = row_ptr.diff()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError("corrupted CSR row pointers")
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= in_f):
        raise ValueError("corrupted CSR column indices: out of range")
    rows = torch.repeat_interleave(torch.arange(out_f, device=cols.device), counts)
    if bool((cols[1:] <= cols[:-1])[rows[1:] == rows[:-1]].any()):
        raise ValueError("corrupted CSR column indices: repeated or unsorted within a row")
    return rows, cols


def _decode_csr(t: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    out_f, in_f = shape
    values = t["values"]
    rows, cols = csr_rows_and_columns(t["col_indices"], t["row_ptr"], values.numel(), shape)
    dense = torch.zeros(out_f, in_f, dtype=values.dtype, device=values.device)
    dense[rows, cols] = values
    return dense


def encode_sparse(weight: Tensor, pattern: str | StorageLayout) -> dict[str, Tensor]:
    """Encode a 2-D (out × in) matrix under ``pattern``; raises if it violates it."""
    p = parse_layout(pattern) if isinstance(pattern, str) else pattern
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    if p.kind == "nm":
        return _encode_nm(w, p.n, p.m)
    if p.kind == "unstructured":
        return _encode_csr(w)
    return {"values": w.contiguous()}


def decode_sparse(tensors: dict[str, Tensor], pattern: str | StorageLayout, shape: tuple[int, int]) -> Tensor:
    """Rebuild the dense-storage matrix from :func:`encode_sparse` output."""
    p = parse_layout(pattern) if isinstance(pattern, str) else pattern
    if p.kind == "nm":
        return _decode_nm(tensors, p.n, p.m, shape)
    if p.kind == "unstructured":
        return _decode_csr(tensors, shape)
    return tensors["values"].clone()


def sparse_tensor_specs(
    pattern: str | StorageLayout, shape: tuple[int, int], dtype: torch.dtype, nnz: int | None = None
) -> dict[str, TensorSpec]:
    """Expected (shape, dtype) of every encoded tensor; ``nnz`` is needed for CSR."""
    p = parse_layout(pattern) if isinstance(pattern, str) else pattern
    out_f, in_f = shape
    if p.kind == "nm":
        per_row = math.ceil(in_f / p.m) * p.n
        return {
            "values": ((out_f, per_row), dtype),
            "indices": ((math.ceil(out_f * per_row * index_bits(p.m) / 8),), torch.uint8),
        }
    if p.kind == "unstructured":
        if nnz is None:
            raise ValueError("unstructured layers need nnz to know their tensor shapes")
        col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
        return {"values": ((nnz,), dtype), "col_indices": ((nnz,), col_dtype), "row_ptr": ((out_f + 1,), ptr_dtype)}
    return {"values": ((out_f, in_f), dtype)}


def sparse_analytic_bytes(
    pattern: str | StorageLayout, shape: tuple[int, int], value_bytes: int, nnz: int | None = None
) -> float:
    """Storage predicted from first principles: kept values × value bytes + index bits / 8."""
    p = parse_layout(pattern) if isinstance(pattern, str) else pattern
    out_f, in_f = shape
    if p.kind == "nm":
        kept = out_f * math.ceil(in_f / p.m) * p.n
        return kept * value_bytes + kept * index_bits(p.m) / 8
    if p.kind == "unstructured":
        if nnz is None:
            raise ValueError("unstructured layers need nnz for an analytic size")
        col_dtype, ptr_dtype = csr_index_dtypes(in_f, nnz)
        col_bytes = torch.empty(0, dtype=col_dtype).element_size()
        ptr_bytes = torch.empty(0, dtype=ptr_dtype).element_size()
        return nnz * (value_bytes + col_bytes) + (out_f + 1) * ptr_bytes
    return out_f * in_f * value_bytes
