"""Fit each layer to the dense model's outputs of that layer (``layer_target="model"``).

By default a layer is fitted to ``X_c W``: the dense layer applied to the inputs ``X_c`` the
already compressed layers before it produce, so error carried in from earlier layers is left
alone. With ``layer_target="model"`` the layer is fitted to the dense model's own outputs
``X_d W`` instead (the asymmetric objective of GPTAQ-style calibration), so each layer also
corrects what came in:

    min_Ŵ ‖X_d Wᵀ − X_c Ŵᵀ‖² + ‖Λ^½ (Wᵀ − Ŵᵀ)‖²

with Λ the engine's damping. Setting the gradient to zero shows this is the ordinary problem
``‖X_c (Ŵ − W')ᵀ‖² + ‖Λ^½ (Ŵ − W')ᵀ‖²`` for the moved target

    W'ᵀ = Wᵀ + (H + Λ)⁻¹ (C − H) Wᵀ,   H = X_cᵀX_c / n,   C = X_cᵀX_d / n,

so every solver runs unchanged on ``W'`` and the same damped H (W' = W when X_c = X_d). The cost
is one dense pass per block (which also advances the dense model's hidden states) and one
X_cᵀX_d product per input group next to the Hessian.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hasslefree.hessian import prepare_hessian
from hasslefree.pipeline.block_passes import propagate
from hasslefree.pipeline.capture import BlockInputs
from hasslefree.pipeline.plan import TargetLayer

LAYER_TARGETS = ("layer", "model")


@torch.no_grad()
def dense_pass(block: nn.Module, index: int, groups: Sequence[Sequence[TargetLayer]], hidden: list[torch.Tensor],
               inputs: BlockInputs, device: torch.device,
               dtype: torch.dtype) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Run the still dense ``block`` on the dense model's block inputs ``hidden``: every group's
    input for every batch (on the CPU, in ``dtype``) and the block's outputs."""
    captured: list[list[torch.Tensor]] = [[] for _ in groups]

    def keeper(store: list[torch.Tensor]):
        def hook(_module: nn.Module, args: tuple) -> None:
            store.append(args[0].detach().to("cpu", dtype))
        return hook

    handles = [block.get_submodule(group[0].relative).register_forward_pre_hook(keeper(store))
               for group, store in zip(groups, captured)]
    try:
        outputs = propagate(block, index, hidden, inputs, device, dtype)
    finally:
        for handle in handles:
            handle.remove()
    for group, store in zip(groups, captured):
        if len(store) != len(hidden):
            raise RuntimeError(f"{group[0].name} ran {len(store)} times over {len(hidden)} calibration batches; "
                               "layer_target='model' needs one call per batch")
    return captured, outputs


def moved_targets(weights: Mapping[str, torch.Tensor], hessian: torch.Tensor, cross: torch.Tensor, *,
                  percdamp: float, coordinate_damp: float) -> dict[str, torch.Tensor]:
    """W' for every weight of a group (see the module docstring), in float32."""
    prepared = prepare_hessian(hessian, percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=torch.float64)
    # (C − H) from the accumulated H, so W' = W exactly when C = H (dead inputs: both rows zero)
    shift = torch.cholesky_solve(cross.to(torch.float64) - hessian.to(torch.float64), prepared.chol)
    return {name: (w.to(torch.float64) + w.to(torch.float64) @ shift.T).to(torch.float32)
            for name, w in weights.items()}
