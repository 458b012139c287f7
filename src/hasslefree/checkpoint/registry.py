"""Registry of per-module-type codecs, so new compressed layers plug into the format.

A codec turns one compressed module into named tensors plus JSON metadata and
back. Register it once (``register_codec(MyLayer, MyCodec())``) and
``save_compressed`` / ``load_compressed`` / ``checkpoint_info`` handle it
without changes here.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["ModuleCodec", "register_codec", "codec_for_module", "codec_for_kind", "registered_kinds"]

TensorSpec = tuple[tuple[int, ...], torch.dtype | str]  # dtype or its name, e.g. "bfloat16"


class ModuleCodec(ABC):
    """Encode/decode one compressed module type.

    ``kind`` is the stable name written to ``hasslefree_config.json``. Metadata
    must be JSON-serialisable and hold everything needed to rebuild the module;
    it must include ``in_features``, ``out_features`` and ``dtype`` (a torch dtype
    name such as "bfloat16") so size accounting works for every codec.
    """

    kind: ClassVar[str]

    @abstractmethod
    def encode(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Return (tensors keyed by a name relative to the module, metadata)."""

    @abstractmethod
    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, TensorSpec]:
        """Expected (shape, dtype or dtype name) of every tensor ``encode`` writes, from metadata alone."""

    @abstractmethod
    def decode(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> nn.Module:
        """Rebuild the module (on the tensors' device) from its tensors and metadata."""

    @abstractmethod
    def analytic_bytes(self, meta: dict[str, Any]) -> float:
        """Storage predicted from first principles, to check the measured bytes against."""

    def summary(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Short human-facing description (pattern, rank, …) for info tables."""
        return {"pattern": meta.get("pattern", "-"), "rank": meta.get("rank", "-")}


_BY_TYPE: dict[type[nn.Module], ModuleCodec] = {}
_BY_KIND: dict[str, ModuleCodec] = {}


def register_codec(module_type: type[nn.Module], codec: ModuleCodec, *, overwrite: bool = False) -> None:
    """Make ``codec`` handle ``module_type`` (and its subclasses) in checkpoints."""
    kind = getattr(codec, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{type(codec).__name__} needs a non-empty string 'kind'")
    existing = _BY_KIND.get(kind)
    if existing is not None and type(existing) is not type(codec) and not overwrite:
        raise ValueError(f"codec kind {kind!r} is already registered by {type(existing).__name__}")
    if module_type in _BY_TYPE and not overwrite and type(_BY_TYPE[module_type]) is not type(codec):
        raise ValueError(f"{module_type.__name__} already has codec {type(_BY_TYPE[module_type]).__name__}")
    _BY_TYPE[module_type] = codec
    _BY_KIND[kind] = codec
    logger.debug("registered codec %r for %s", kind, module_type.__name__)


def codec_for_module(module: nn.Module) -> ModuleCodec | None:
    """The codec for this module's type (nearest registered base class), or None."""
    for cls in type(module).__mro__:
        codec = _BY_TYPE.get(cls)
        if codec is not None:
            return codec
    return None


def codec_for_kind(kind: str) -> ModuleCodec:
    """The codec registered under ``kind``; KeyError lists the known kinds."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise KeyError(f"no codec registered for kind {kind!r}; known: {sorted(_BY_KIND)}") from None


def registered_kinds() -> list[str]:
    """Names of all registered codecs."""
    return sorted(_BY_KIND)
