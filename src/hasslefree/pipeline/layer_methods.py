"""The one interface every way of compressing a layer group implements, so the pipeline has
no method-specific branches: :func:`method_for` picks the implementation from a layer's
settings, :meth:`LayerMethod.fit` solves a group of layers that share one Hessian, and
:meth:`LayerMethod.build_module` turns a result into the module that replaces the layer.

Two implementations: sparse + low rank (:func:`hasslefree.decompose_group`, giving
:class:`~hasslefree.nn.SparseLowRankLinear`) and sparse + HSS (:class:`~hasslefree.hss.HSSLinear`).
Each result also answers what the run report needs (objectives, history, rank, parameters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from hasslefree.decompose import Decomposition, decompose_group
from hasslefree.patterns import SparsityPattern
from hasslefree.pipeline.hss_layers import HSSResult, fit_hss_layer
from hasslefree.pipeline.layers import compressed_module, layer_weight
from hasslefree.pipeline.plan import LayerSettings, TargetLayer
from hasslefree.stage_clock import Clock


class LayerMethod(Protocol):
    """Compresses layers that read the same input."""

    def fit(self, block: nn.Module, targets: Sequence[TargetLayer], settings: LayerSettings, hessian: torch.Tensor,
            device: torch.device, *, seed: int, engine_options: Mapping[str, Any],
            clock: Clock | None, weights: Mapping[str, torch.Tensor] | None = None) -> dict[TargetLayer, Any]:
        """One result per target, all from the same ``hessian`` (XᵀX of their shared input);
        ``weights`` (by layer name) replace the modules' own weights as the targets to fit."""

    def build_module(self, original: nn.Module, result: Any, pattern: SparsityPattern) -> nn.Module:
        """The module that replaces ``original`` in the compressed model."""


class SparseLowRankMethod:
    """W ≈ W_S + U Vᵀ by :func:`hasslefree.decompose_group` (every preset: HASSLE-free, OATS, pruning)."""

    def fit(self, block: nn.Module, targets: Sequence[TargetLayer], settings: LayerSettings, hessian: torch.Tensor,
            device: torch.device, *, seed: int, engine_options: Mapping[str, Any],
            clock: Clock | None, weights: Mapping[str, torch.Tensor] | None = None) -> dict[TargetLayer, Decomposition]:
        goals = {t.name: (weights[t.name] if weights is not None else layer_weight(block.get_submodule(t.relative)))
                 .to(device, torch.float32) for t in targets}
        found = decompose_group(goals, hessian, seed=seed, **settings.layer_arguments(), **engine_options,
                                clock=clock)
        return {t: found[t.name] for t in targets}

    def build_module(self, original: nn.Module, result: Decomposition, pattern: SparsityPattern) -> nn.Module:
        return compressed_module(original, result, pattern)


class HSSMethod:
    """Sparse S plus a hierarchical (HSS) low-rank matrix, one layer at a time."""

    def fit(self, block: nn.Module, targets: Sequence[TargetLayer], settings: LayerSettings, hessian: torch.Tensor,
            device: torch.device, *, seed: int, engine_options: Mapping[str, Any],
            clock: Clock | None, weights: Mapping[str, torch.Tensor] | None = None) -> dict[TargetLayer, HSSResult]:
        percdamp = engine_options.get("percdamp", 0.01)
        return {t: fit_hss_layer(block.get_submodule(t.relative), t, hessian, device, percdamp,
                                 weight=None if weights is None else weights[t.name]) for t in targets}

    def build_module(self, original: nn.Module, result: HSSResult, pattern: SparsityPattern) -> nn.Module:
        return result.module


SPARSE_LOW_RANK = SparseLowRankMethod()
HSS = HSSMethod()


def method_for(settings: LayerSettings) -> LayerMethod:
    """The implementation a layer's settings ask for."""
    return HSS if settings.is_hss else SPARSE_LOW_RANK
