"""Where each model family keeps its decoder blocks, and which linear layers share an input.

An entry is a few declarative lines: the dotted path of the block list and the ordered
groups of layer names (relative to a block) that read the same activation, so the
pipeline builds one Hessian per group. Clones of an architecture inherit in one line.
Models whose ``config.model_type`` is not listed fall back to :mod:`.discover`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

Groups = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Architecture:
    """Block path plus ordered shared-input groups, in the order a block's forward reads them."""

    name: str
    blocks: str
    groups: Groups
    model_types: tuple[str, ...] = ()

    def clone(self, name: str, *model_types: str, **changes) -> "Architecture":
        """A family that differs only in name (and whatever ``changes`` says)."""
        return dataclasses.replace(self, name=name, model_types=model_types or (name,), **changes)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The model's block list, with a message naming the path when it is missing."""
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no block list at {self.blocks!r} "
                             f"(expected for architecture {self.name!r})") from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{self.blocks!r} of {type(model).__name__} is not a non-empty nn.ModuleList")
        return blocks


LLAMA = Architecture(
    "llama", "model.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    ("llama",),
)
PHI3 = Architecture(
    "phi3", "model.layers",
    (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)
OPT = Architecture(
    "opt", "model.decoder.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
     ("fc1",), ("fc2",)),
)
GPT2 = Architecture(
    "gpt2", "transformer.h",
    (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    LLAMA,
    LLAMA.clone("mistral"),
    LLAMA.clone("qwen2"),
    LLAMA.clone("qwen3"),
    LLAMA.clone("gemma"),
    LLAMA.clone("gemma2"),
    LLAMA.clone("gemma3", "gemma3_text"),
    PHI3.clone("phi3"),
    OPT.clone("opt"),
    GPT2.clone("gpt2"),
)
"""Every known family; SmolLM2 is a Llama (model_type "llama")."""

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}


def lookup(model_type: str | None) -> Architecture | None:
    """The registry entry for a ``config.model_type``, or None."""
    return BY_MODEL_TYPE.get(model_type or "")


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
    from hasslefree.pipeline.discover import discover_architecture

    logger.info("model type %r is not in the registry: discovering blocks and groups", model_type)
    return discover_architecture(model)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
