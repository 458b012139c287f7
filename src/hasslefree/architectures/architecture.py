"""One model family's layout: where its decoder blocks live and which linear layers share an input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

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
