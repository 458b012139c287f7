"""Run-time form of :class:`SparseLowRankLinear` that keeps W_S packed in memory.

:class:`SparseLowRankLinear` stores W_S densely (zeros included) next to U and V, so a
loaded model is larger than the dense one. :class:`PackedSparseLowRankLinear` keeps the
compact representation as buffers instead:

* ``N:M`` (keep N of every M consecutive inputs per output row): ``values`` (out × ⌈in/M⌉·N,
  layer dtype) and ``indices``, the in-group position of every kept value at ⌈log2 M⌉ bits,
  bit-packed into ``uint8`` exactly as the checkpoint codec writes it
  (:mod:`hasslefree.sparse_storage`), so loading needs no re-encoding. A trailing partial
  group is zero-padded; groups with fewer than N nonzeros hold explicit zeros.
* ``unstructured``: ``mask`` (out × ⌈in/8⌉ ``uint8``, 1 bit per weight, little-endian within a
  byte, each row starting on a byte) and ``values``, the nonzeros in row-major order.
* ``dense``: ``values`` is W_S itself.

U, V and bias stay as they are (parameters). Conversions both ways are exact bit for bit
(``-0.0`` in W_S is normalised to +0.0, as :meth:`SparseLowRankLinear.from_linear_parts` does).

Forward, ``y = x W_Sᵀ + (x V) Uᵀ + b``, never densifies the whole layer:

* *tiled* (any number of tokens): W_S is unpacked ``tile_rows`` output rows at a time into a
  small dense tile and multiplied with ``F.linear``;
* *gather* (N:M layers, at most ``decode_tokens`` tokens): per output row, x is gathered at the
  kept columns and contracted with the kept values (a batched matmul over rows), which skips
  the zero fill and the multiplications by the dropped weights;
* *kernel* (N:M and unstructured layers, CPU, at most ``decode_tokens`` tokens, no autograd):
  compiled numba kernels (:mod:`hasslefree.nn.packed_kernels`) that read the packed values and
  positions (or mask bits) once per call, gather x and accumulate in float32, with the
  low-rank branch and the bias fused. Without numba the torch paths above run instead, after
  one warning per process; ``HASSLEFREE_NO_KERNELS=1`` turns the kernels off.

Everything except the kernel runs on the device the buffers are on; other devices always take
the torch paths.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hasslefree.nn import packed_dispatch
from hasslefree import sparse_storage
from hasslefree.nn.packed_format import check_nm_layout, nm_positions, pack_mask, popcount_u8, positive_zeros, unpack_mask
from hasslefree.nn.sparse_lowrank_linear import SparseLowRankLinear

logger = logging.getLogger(__name__)

__all__ = ["PackedSparseLowRankLinear"]

class PackedSparseLowRankLinear(nn.Module):
    """``y = x W_Sᵀ + (x V) Uᵀ + b`` with W_S held packed (see the module docstring).

    Build it with :meth:`from_module` or from a checkpoint's encoding
    (:func:`hasslefree.checkpoint.linear_codec.packed_from_encoded`); the constructor takes the packed
    buffers and checks them. ``tile_rows`` (rounded up to a multiple of 8, so every N:M row tile
    starts on a byte of ``indices``) and ``decode_tokens`` (the largest token count that takes
    the CPU kernel or the gather path) are plain attributes and may be changed at any time.
    """

    tile_rows: int = 512
    decode_tokens: int = 8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        pattern: str,
        packed: dict[str, Tensor],
        U: Tensor,
        V: Tensor,
        bias: Tensor | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__()
        p = sparse_storage.parse_layout(pattern)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.pattern = str(p)
        self.kind = p.kind
        self.n, self.m = p.n, p.m
        self.bits = sparse_storage.index_bits(p.m) if p.kind == "nm" else 0
        where = f"layer {name!r}: " if name else ""
        try:
            self._check_and_register(packed, U, V, bias)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None

    # ------------------------------------------------------------ construction
    def _check_and_register(self, packed: dict[str, Tensor], U: Tensor, V: Tensor, bias: Tensor | None) -> None:
        out_f, in_f = self.out_features, self.in_features
        if out_f < 0 or in_f < 0:
            raise ValueError(f"dimensions must be non-negative, got in={in_f}, out={out_f}")
        expect = {"nm": ("values", "indices"), "unstructured": ("mask", "values"), "dense": ("values",)}[self.kind]
        if set(packed) != set(expect):
            raise ValueError(f"{self.pattern} layer needs packed tensors {sorted(expect)}, got {sorted(packed)}")
        values = packed["values"]
        dtype = values.dtype
        if not dtype.is_floating_point:
            raise ValueError(f"values must be floating point, got {dtype}")
        device = values.device

        def check(label: str, t: Tensor, shape: tuple[int, ...], want: torch.dtype) -> Tensor:
            if not isinstance(t, Tensor):
                raise ValueError(f"{label} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape or t.dtype != want:
                raise ValueError(f"{label} must be {want} {list(shape)}, got {t.dtype} {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"{label} is on {t.device}, values on {device}")
            return t.detach().contiguous()

        if self.kind == "nm":
            per_row = math.ceil(in_f / self.m) * self.n
            check("values", values, (out_f, per_row), dtype)
            nbytes = math.ceil(out_f * per_row * self.bits / 8)
            indices = check("indices", packed["indices"], (nbytes,), torch.uint8)
            check_nm_layout(values, indices, self.out_features, self.in_features, self.n, self.m, self.bits,
                            self._tile(), self.pattern)
            self.register_buffer("values", positive_zeros(values.detach()).contiguous())
            self.register_buffer("indices", indices)
        elif self.kind == "unstructured":
            mask = check("mask", packed["mask"], (out_f, math.ceil(in_f / 8)), torch.uint8)
            if values.dim() != 1:
                raise ValueError(f"values must be 1-D (the nonzeros in row-major order), got {list(values.shape)}")
            if in_f % 8 and mask.numel() and bool((mask[:, -1] >> (in_f % 8)).any()):
                raise ValueError("mask has bits set past the last column")
            count = int(popcount_u8(mask).sum(dtype=torch.int64))
            if count != values.numel():
                raise ValueError(f"mask marks {count} weights but {values.numel()} values are stored")
            self.register_buffer("mask", mask)
            self.register_buffer("values", positive_zeros(values.detach()).contiguous())
        else:
            self.register_buffer("values", positive_zeros(check("values", values, (out_f, in_f), dtype)))
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(f"U and V must be (out, r) and (in, r), got {list(U.shape)} and {list(V.shape)}")
        rank = U.shape[1]
        self.rank = int(rank)
        self.U = nn.Parameter(check("U", U, (out_f, rank), dtype))
        self.V = nn.Parameter(check("V", V, (in_f, rank), dtype))
        if bias is not None:
            self.bias = nn.Parameter(check("bias", bias, (out_f,), dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, module: SparseLowRankLinear, *, name: str | None = None) -> PackedSparseLowRankLinear:
        """Pack a dense-storage layer (U, V, bias and a dense-pattern W_S are shared, not copied)."""
        if not isinstance(module, SparseLowRankLinear):
            raise TypeError(f"expected a SparseLowRankLinear, got {type(module).__name__}")
        w = positive_zeros(module.sparse_weight.detach())
        p = sparse_storage.parse_layout(module.pattern)
        try:
            if p.kind == "nm":
                packed = sparse_storage.encode_sparse(w, p)
            elif p.kind == "unstructured":
                keep = w != 0
                packed = {"mask": pack_mask(keep), "values": w[keep]}
            else:
                packed = {"values": w}
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}" if name else str(exc)) from None
        bias = None if module.bias is None else module.bias.detach()
        return cls(module.in_features, module.out_features, str(p), packed, module.U.detach(), module.V.detach(),
                   bias, name=name)

    # ------------------------------------------------------------ unpacking
    def _tile(self, rows: int | None = None) -> int:
        rows = int(rows if rows is not None else self.tile_rows)
        return max(8, -(-rows // 8) * 8)

    def _positions(self, indices: Tensor, tile: int, device: torch.device) -> Any:
        """Yield (r0, r1, positions (rows × groups × N) int64) for every N:M row tile."""
        return nm_positions(indices, self.out_features, self.in_features, self.n, self.m, self.bits, tile, device)

    def _dense_tiles(self, tile: int) -> Any:
        """Yield (r0, r1, W_S[r0:r1] as a dense (rows × in) tensor)."""
        out_f, in_f = self.out_features, self.in_features
        values = self.values
        if self.kind == "dense":
            for r0 in range(0, out_f, tile):
                yield r0, min(r0 + tile, out_f), values[r0 : r0 + tile]
        elif (kernels := packed_dispatch.unpack_kernels_for(self)) is not None:  # compiled, same bits
            offsets = packed_dispatch.row_offsets(self) if self.kind != "nm" else None
            for r0 in range(0, out_f, tile):
                r1 = min(r0 + tile, out_f)
                if self.kind == "nm":
                    yield r0, r1, kernels.nm_unpack_rows(values, self.indices, self.n, self.m, self.bits, r0, r1, in_f)
                else:
                    yield r0, r1, kernels.mask_unpack_rows(self.mask, values, offsets, r0, r1, in_f)
        elif self.kind == "nm":
            groups, n, m = math.ceil(in_f / self.m), self.n, self.m
            for r0, r1, pos in self._positions(self.indices, tile, values.device):
                buf = torch.zeros(r1 - r0, groups, m, dtype=values.dtype, device=values.device)
                buf.scatter_(-1, pos, values[r0:r1].view(r1 - r0, groups, n))
                yield r0, r1, buf.view(r1 - r0, groups * m)[:, :in_f]
        else:
            offset = 0
            for r0 in range(0, out_f, tile):
                r1 = min(r0 + tile, out_f)
                keep = unpack_mask(self.mask[r0:r1], in_f)
                count = int(keep.sum())
                w = torch.zeros(r1 - r0, in_f, dtype=values.dtype, device=values.device)
                w.masked_scatter_(keep, values[offset : offset + count])
                offset += count
                yield r0, r1, w

    @torch.no_grad()
    def sparse_dense(self) -> Tensor:
        """W_S (out × in) in dense storage, bit for bit as packed."""
        if self.kind == "dense":
            return self.values.clone()
        tiles = [w for _, _, w in self._dense_tiles(self._tile())]
        if not tiles:
            return self.values.new_zeros(self.out_features, self.in_features)
        return torch.cat(tiles, dim=0).contiguous()

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """Merged ``W_S + U Vᵀ`` (out × in), summed in float32 at least (as SparseLowRankLinear)."""
        acc = torch.promote_types(self.values.dtype, torch.float32)
        dense = self.sparse_dense().to(acc)
        if self.rank > 0:
            dense = dense + self.U.to(acc) @ self.V.to(acc).t()
        return dense.to(self.values.dtype)

    def to_module(self) -> SparseLowRankLinear:
        """The dense-storage layer with the same bits (U, V and bias are shared, not copied)."""
        sparse = self.sparse_dense()
        module = SparseLowRankLinear(self.in_features, self.out_features, self.rank, bias=self.bias is not None,
                                     pattern=self.pattern, device="meta", dtype=sparse.dtype)
        module.sparse_weight = nn.Parameter(sparse, requires_grad=self.U.requires_grad)
        module.U = nn.Parameter(self.U.detach(), requires_grad=self.U.requires_grad)
        module.V = nn.Parameter(self.V.detach(), requires_grad=self.V.requires_grad)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach(), requires_grad=self.bias.requires_grad)
        return module

    def stored_bytes(self) -> int:
        """Bytes held by this layer's tensors (packed W_S, U, V, bias)."""
        tensors = [*self.buffers(recurse=False), *self.parameters(recurse=False)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features)
        few = 0 < x2d.shape[0] <= self.decode_tokens
        decode = packed_dispatch.decoder_for(self, x2d) if few else None
        if decode is not None:
            y = decode(x2d)
        elif self.kind == "nm" and few:
            y = self.forward_gather(x2d)
        else:
            y = self.forward_tiled(x2d)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def forward_kernel(self, x2d: Tensor) -> Tensor:
        """(tokens × in) → (tokens × out) with the compiled CPU kernel (N:M and unstructured
        layers; any number of tokens, though it is meant for a few). No autograd. Raises when
        the kernel cannot run (numba missing or disabled, not on the CPU, unsupported dtype)."""
        return packed_dispatch.forward_kernel(self, x2d)

    def _low_rank(self, x2d: Tensor, y: Tensor) -> Tensor:
        if self.rank > 0:
            y = y + F.linear(F.linear(x2d, self.V.t()), self.U)
        return y

    def forward_tiled(self, x2d: Tensor) -> Tensor:
        """(tokens × in) → (tokens × out): W_S unpacked ``tile_rows`` rows at a time, ``F.linear``
        per tile, then the low-rank branch. One tile gives exactly SparseLowRankLinear's ops."""
        bias = self.bias
        if self.kind == "dense":
            return self._low_rank(x2d, F.linear(x2d, self.values, bias))
        tile = self._tile()
        if 0 < self.out_features <= tile:
            (_, _, w), = self._dense_tiles(tile)
            return self._low_rank(x2d, F.linear(x2d, w, bias))
        y = x2d.new_empty(x2d.shape[0], self.out_features)
        for r0, r1, w in self._dense_tiles(tile):
            y[:, r0:r1] = F.linear(x2d, w, None if bias is None else bias[r0:r1])
        return self._low_rank(x2d, y)

    def forward_gather(self, x2d: Tensor) -> Tensor:
        """(tokens × in) → (tokens × out) for N:M layers: x gathered at the kept columns of each
        row and contracted with the kept values (``bmm`` over rows), tile by tile."""
        if self.kind != "nm":
            raise ValueError(f"the gather path needs an N:M layer, this one is {self.pattern}")
        in_f, n, m = self.in_features, self.n, self.m
        groups = math.ceil(in_f / m)
        values = self.values
        # Padding columns are zero in x, and their stored values are checked to be zero.
        xt = F.pad(x2d, (0, groups * m - in_f)).t().contiguous()  # (in_pad, tokens)
        base = torch.arange(groups, device=values.device).mul_(m).view(1, groups, 1)
        y = x2d.new_empty(self.out_features, x2d.shape[0])
        for r0, r1, pos in self._positions(self.indices, self._tile(), values.device):
            cols = (pos + base).view(r1 - r0, groups * n)
            y[r0:r1] = torch.bmm(values[r0:r1].unsqueeze(1), xt[cols]).squeeze(1)
        y = y.t()
        if self.bias is not None:
            y = y + self.bias
        return self._low_rank(x2d, y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, pattern={self.pattern!r}, bias={self.bias is not None}, packed=True"
        )
