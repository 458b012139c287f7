"""Sparse + HSS layers inside the sequential pipeline.

The pipeline gives an HSS layer what it gives every other layer, the Hessian of its input
accumulated on the already-compressed model; only the data-aware variants use it for the
fit, all of them use it to report f/f(0). :class:`HSSResult` answers the questions the
pipeline asks of a :class:`hasslefree.Decomposition` (rank, parameters, objective history,
dense form), so records, dense write-back and resume work unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from hasslefree.hss import HSSLinear, HSSOptions, compress_linear_hss
from hasslefree.hss.construct import DATA_AWARE_VARIANTS
from hasslefree.objective import layer_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.pipeline.layers import layer_weight
from hasslefree.pipeline.plan import TargetLayer

__all__ = ["HSSResult", "fit_hss_layer"]


@dataclass
class HSSResult:
    """One fitted HSS layer (already in the original layer's dtype and device) and its scores."""

    module: HSSLinear
    pattern: SparsityPattern
    method: str
    rank: int
    initial_objective: float
    objective: float
    seconds: float

    @property
    def history(self) -> list[float]:
        return [self.objective]

    @property
    def best_iteration(self) -> int:
        return 1

    @property
    def iterations(self) -> int:
        return 1

    @property
    def parameter_count(self) -> int:
        return self.module.parameter_count(include_bias=False)

    def to_dense(self) -> torch.Tensor:
        return self.module.to_dense()


def fit_hss_layer(module: nn.Module, target: TargetLayer, hessian: torch.Tensor, device: torch.device,
                  percdamp: float = 0.01, weight: torch.Tensor | None = None) -> HSSResult:
    """Build the HSS replacement of ``module`` (fitted in float32) and score it on ``hessian``;
    ``weight`` replaces the module's own as the target to fit."""
    options: HSSOptions = target.settings.hss or HSSOptions()
    began = time.perf_counter()
    weight = (layer_weight(module) if weight is None else weight).to(device, torch.float32)
    bias = getattr(module, "bias", None)
    size = ({"budget_params": options.budget_params(weight.shape)} if options.budget is not None
            else {"outer_rank": target.rank})
    layer = compress_linear_hss(
        weight,
        None if bias is None else bias.detach().to(device, torch.float32),
        sparsity=options.sparsity,
        leaf=options.leaf,
        min_rank=options.min_rank,
        rank_decay=options.rank_decay,
        variant=target.settings.method,
        hessian=hessian if target.settings.method in DATA_AWARE_VARIANTS else None,
        sweeps=options.sweeps,
        percdamp=percdamp,
        **size,
    )
    h = hessian.to(torch.float64)
    w64 = weight.to(torch.float64)
    initial = layer_objective(w64, torch.zeros_like(w64), h)
    final = layer_objective(w64, layer.to_dense().to(torch.float64), h)
    layer = layer.to(device=module.weight.device, dtype=module.weight.dtype)
    return HSSResult(layer, target.pattern, target.settings.method, int(layer.config["outer_rank"]), initial, final,
                     time.perf_counter() - began)
