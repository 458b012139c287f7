"""Model families: where the decoder blocks live and which linear layers share an input.

Known families are declared in :mod:`.registry`; any other model is discovered by
:mod:`.discover`. :func:`resolve_architecture` picks between the two.
"""

from __future__ import annotations

import logging

from torch import nn

from hasslefree.architectures.architecture import Architecture, Groups
from hasslefree.architectures.discover import discover_architecture
from hasslefree.architectures.layer_kinds import is_conv1d, is_linear_like
from hasslefree.architectures.registry import ARCHITECTURES, BY_MODEL_TYPE, lookup

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "Architecture", "BY_MODEL_TYPE", "Groups", "discover_architecture", "is_conv1d",
           "is_linear_like", "lookup", "resolve_architecture"]


def resolve_architecture(model: nn.Module, *, allow_discovery: bool = True) -> Architecture:
    """The registry entry for ``model``, checked against it; else a discovered one.

    Fails with a ValueError naming what is missing, so a wrong entry never silently
    compresses the wrong layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = lookup(model_type)
    if arch is not None:
        blocks = arch.block_list(model)
        missing = [n for n in arch.layer_names if not _has_submodule(blocks[0], n)]
        if missing:
            raise ValueError(f"{type(model).__name__} ({model_type}): block 0 lacks {', '.join(missing)} "
                             f"expected by the {arch.name!r} registry entry")
        return arch
    if not allow_discovery:
        raise ValueError(f"no registry entry for model type {model_type!r}; known: "
                         f"{', '.join(sorted(BY_MODEL_TYPE))}")
    logger.info("model type %r is not in the registry: discovering blocks and groups", model_type)
    return discover_architecture(model)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
