"""Random weights for models built on the meta device (timing and memory need no real ones)."""

from __future__ import annotations

import torch
from torch import nn


def fill_random_(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Give ``module``'s own parameters real storage in ``dtype``: norms 1, the rest N(0, 0.02²),
    filled in place in the target dtype (no float32 copy); no gradients."""
    for name, param in list(module.named_parameters(recurse=False)):
        data = torch.empty(param.shape, dtype=dtype)
        if name == "weight" and param.dim() == 1:
            data.fill_(1.0)  # norms
        else:
            data.normal_(0.0, 0.02, generator=generator)
        module._parameters[name] = nn.Parameter(data, requires_grad=False)
