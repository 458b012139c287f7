"""Whole-model conversions between the dense-storage and the packed run-time layers."""

from __future__ import annotations

import logging

from torch import nn

from hasslefree.nn.packed_linear import PackedSparseLowRankLinear
from hasslefree.nn.sparse_lowrank_linear import SparseLowRankLinear, replace_linear

logger = logging.getLogger(__name__)

__all__ = ["pack_model", "unpack_model"]


def pack_model(model: nn.Module, *, tile_rows: int | None = None) -> nn.Module:
    """Replace every :class:`SparseLowRankLinear` in ``model`` by its packed form, in place.

    Returns ``model``. Each layer is converted on its own device, one at a time."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, SparseLowRankLinear)]
    for name in names:
        packed = PackedSparseLowRankLinear.from_module(model.get_submodule(name), name=name)
        if tile_rows is not None:
            packed.tile_rows = tile_rows
        replace_linear(model, name, packed)
    logger.debug("packed %d SparseLowRankLinear layers", len(names))
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    """Inverse of :func:`pack_model`: packed layers back to dense-storage SparseLowRankLinear."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, PackedSparseLowRankLinear)]
    for name in names:
        replace_linear(model, name, model.get_submodule(name).to_module())
    return model
