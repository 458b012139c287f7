"""Which packed-layer calls go to the compiled CPU kernels, and running them.

The kernels (:mod:`hasslefree.nn.packed_kernels`, numba) are imported on first use; without
numba they are skipped after one warning per process, and ``HASSLEFREE_NO_KERNELS=1`` turns
them off.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from hasslefree.nn.packed_format import popcount_u8

NO_KERNELS_ENV = "HASSLEFREE_NO_KERNELS"


@functools.lru_cache(maxsize=None)
def _load_kernels() -> ModuleType | None:
    """:mod:`hasslefree.nn.packed_kernels`, or None (after one warning) when numba is missing."""
    try:
        return importlib.import_module("hasslefree.nn.packed_kernels")
    except ImportError as exc:
        warnings.warn(f"numba is not available ({exc}): packed layers decode on CPU with the slower "
                      "pure-torch paths (pip install numba, or the 'models' extra, for the compiled kernels)",
                      RuntimeWarning, stacklevel=4)
        return None


def decode_kernels() -> ModuleType | None:
    """The compiled CPU decode kernels, or None when numba is unavailable or ``HASSLEFREE_NO_KERNELS``
    is set to anything but ``""``/``"0"`` (importing numba happens here, on first use)."""
    if os.environ.get(NO_KERNELS_ENV, "") not in ("", "0"):
        return None
    return _load_kernels()


def kernels_for(layer: Any, x2d: Tensor) -> ModuleType | None:
    """The kernel module when this call may use it: an N:M or unstructured layer, x and the
    layer on the CPU in the same float32/bfloat16 dtype, and no gradient to track."""
    if layer.kind == "dense" or x2d.device.type != "cpu" or layer.values.device.type != "cpu":
        return None
    if x2d.dtype != layer.values.dtype or x2d.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_grad_enabled() and _tracks_grad(layer, x2d):
        return None
    return decode_kernels()


def unpack_kernels_for(layer: Any) -> ModuleType | None:
    """The kernel module when W_S tiles of this layer may be unpacked by it: N:M or bit-mask
    values (buffers, never trained) on the CPU in float32/bfloat16. The tiles are exact copies
    either way, so this only changes the speed."""
    if layer.kind == "dense" or layer.values.device.type != "cpu":
        return None
    if layer.values.dtype not in (torch.float32, torch.bfloat16) or decode_kernels() is None:
        return None
    return importlib.import_module("hasslefree.nn.packed_unpack")


def row_offsets(layer: Any) -> Tensor:
    """Index of the first stored value of every row (+ the total), int64 on the CPU, from the
    mask popcount; computed once and kept as a plain attribute (not a buffer: it is derived,
    so it stays out of ``state_dict`` and ``stored_bytes``) until the mask changes."""
    key = (layer.mask.data_ptr(), layer.mask._version, tuple(layer.mask.shape), layer.values.numel())
    cached = layer.__dict__.get("_offsets_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    offsets = torch.zeros(layer.out_features + 1, dtype=torch.int64)
    offsets[1:] = popcount_u8(layer.mask.cpu()).sum(dim=1, dtype=torch.int64).cumsum(0)
    if int(offsets[-1]) != layer.values.numel():
        raise ValueError(f"mask marks {int(offsets[-1])} weights but {layer.values.numel()} values are stored")
    layer.__dict__["_offsets_cache"] = (key, offsets)
    return offsets


@dataclass(frozen=True)
class _CachedDecoder:
    """A layer's decoder with the tensors it was made from and their versions."""

    tensors: tuple[Tensor | None, ...]
    versions: tuple[int, ...]
    dtype: torch.dtype
    decode: Callable[[Tensor], Tensor]

    def current(self, tensors: tuple[Tensor | None, ...]) -> bool:
        return (all(a is b for a, b in zip(self.tensors, tensors))
                and self.versions == tuple(-1 if t is None else t._version for t in tensors))


def _kernel_tensors(layer: Any) -> tuple[Tensor | None, ...]:
    """(values, codes, U, V, bias), read from the module's dicts (no ``__getattr__`` per call)."""
    buffers, params = layer._buffers, layer._parameters
    codes = buffers["indices"] if layer.kind == "nm" else buffers["mask"]
    return buffers["values"], codes, params["U"], params["V"], params["bias"]


def decoder_for(layer: Any, x2d: Tensor) -> Callable[[Tensor], Tensor] | None:
    """The layer's compiled decoder when this call may use it (the conditions of
    :func:`kernels_for`), else None. The common case, a decode step calling the layer again with
    nothing changed, is answered from the cache with a few identity and version checks."""
    cached = layer.__dict__.get("_kernel_decoder")
    if (cached is not None and x2d.dtype == cached.dtype and x2d.device.type == "cpu"
            and not (torch.is_grad_enabled() and _tracks_grad(layer, x2d))
            and cached.current(_kernel_tensors(layer)) and decode_kernels() is not None):
        return cached.decode
    kernels = kernels_for(layer, x2d)
    return None if kernels is None else _decoder(kernels, layer)


def _tracks_grad(layer: Any, x2d: Tensor) -> bool:
    return x2d.requires_grad or any(p.requires_grad for p in layer.parameters(False))


def _decoder(kernels: ModuleType, layer: Any) -> Callable[[Tensor], Tensor]:
    """The layer's compiled decoder (its buffers as the kernels take them, the route and its
    constants bound), made once and kept as a plain attribute until any of the tensors is
    replaced or changed in place: rebuilding it on every decode call costs more than the kernel
    on small layers."""
    tensors = _kernel_tensors(layer)
    cached = layer.__dict__.get("_kernel_decoder")
    if cached is not None and cached.current(tensors):
        return cached.decode
    values, codes, U, V, bias = tensors
    offsets = None
    if layer.kind == "nm":
        per_row = math.ceil(layer.in_features / layer.m) * layer.n
        expected = math.ceil(layer.out_features * per_row * layer.bits / 8)
        if codes.numel() != expected:
            raise ValueError(f"indices hold {codes.numel()} bytes, expected {expected}")
    else:
        offsets = row_offsets(layer)
    arrays = kernels.layer_arrays(values, codes, U, V, bias, offsets)
    if layer.kind == "nm":
        decode = kernels.nm_decoder(arrays, layer.n, layer.m, layer.bits, layer.in_features)
    else:
        decode = kernels.unstructured_decoder(arrays, layer.in_features)
    versions = tuple(-1 if t is None else t._version for t in tensors)
    layer.__dict__["_kernel_decoder"] = _CachedDecoder(tensors, versions, values.dtype, decode)
    return decode


@torch.no_grad()
def forward_kernel(layer: Any, x2d: Tensor) -> Tensor:
    """(tokens × in) → (tokens × out) with the compiled CPU kernel (N:M and unstructured
    layers; any number of tokens, though it is meant for a few). No autograd. Raises when
    the kernel cannot run (numba missing or disabled, not on the CPU, unsupported dtype)."""
    if layer.kind == "dense":
        raise ValueError("dense layers have no packed kernel")
    if x2d.device.type != "cpu" or layer.values.device.type != "cpu":
        raise ValueError("the packed kernel runs on the CPU only")
    if x2d.dtype != layer.values.dtype or x2d.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the packed kernel needs float32 or bfloat16 input of the layer dtype "
                         f"{layer.values.dtype}, got {x2d.dtype}")
    kernels = decode_kernels()
    if kernels is None:
        raise RuntimeError(f"the packed kernel is unavailable (numba missing or {NO_KERNELS_ENV} set)")
    return _decoder(kernels, layer)(x2d)
