"""One view of every compressible layer kind: weight as (out x in), dense write-back, swap-in.

GPT-2's ``Conv1D`` stores its weight as (in x out); converting here, at the boundary, keeps
the rest of the pipeline in the PyTorch ``nn.Linear`` orientation the engine expects.
"""

from __future__ import annotations

import torch
from torch import nn

from hasslefree.decompose import Decomposition
from hasslefree.nn import SparseLowRankLinear
from hasslefree.architectures.layer_kinds import is_conv1d
from hasslefree.patterns import SparsityPattern

def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like layer."""
    if is_conv1d(module):
        return int(module.nf), int(module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight in (out x in) orientation (a view, not a copy)."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


@torch.no_grad()
def write_dense(module: nn.Module, merged: torch.Tensor) -> None:
    """Overwrite the layer's weight in place with W_S + U Vᵀ (out x in)."""
    target = module.weight
    value = merged.t() if is_conv1d(module) else merged
    target.copy_(value.to(device=target.device, dtype=target.dtype))


def module_pattern(pattern: SparsityPattern) -> str:
    """The pattern name the compressed module and its checkpoint codec use."""
    if pattern.kind == "nm":
        return f"{pattern.n}:{pattern.m}"
    return "dense" if pattern.kind == "dense" else "unstructured"


def compressed_module(module: nn.Module, result: Decomposition, pattern: SparsityPattern) -> SparseLowRankLinear:
    """A SparseLowRankLinear computing what the original layer would with Ŵ = W_S + U Vᵀ."""
    weight = module.weight
    cast = {"device": weight.device, "dtype": weight.dtype}
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return SparseLowRankLinear.from_linear_parts(
        result.sparse.to(**cast), result.U.to(**cast), result.V.to(**cast), bias,
        pattern=module_pattern(pattern),
    )
