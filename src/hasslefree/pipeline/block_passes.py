"""One block's passes over the calibration batches: its outputs (the next block's inputs) and
the per-group statistics the layer solvers need (H = mean xᵀx, and C = mean x_cᵀx_d when the
layers are fitted to the dense model's outputs, see :mod:`hasslefree.pipeline.dense_targets`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hasslefree.forward_stop import StopForward, run_until_stopped
from hasslefree.hessian import HessianAccumulator
from hasslefree.pipeline.capture import BlockInputs, run_block
from hasslefree.pipeline.distributed import Ranks
from hasslefree.pipeline.plan import TargetLayer

Statistic = tuple[torch.Tensor, "torch.Tensor | None"]


@torch.no_grad()
def propagate(block: nn.Module, index: int, hidden: list[torch.Tensor], inputs: BlockInputs,
              device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The block's outputs for every batch (on the CPU, in ``dtype``): the next block's inputs."""
    block_dtype = next(block.parameters()).dtype
    home = next(block.parameters()).device
    block.to(device)
    try:
        return [run_block(block, states, inputs.call(index, states.shape[0]), device, block_dtype).to("cpu", dtype)
                for states in hidden]
    finally:
        block.to(home)


class CrossAccumulator(HessianAccumulator):
    """Mean of x_cᵀ x_d over calibration tokens: the compressed chain's input against the dense
    model's input of the same layer, batch by batch (same sum, dtype and merge as the Hessian)."""

    @torch.no_grad()
    def add_pair(self, compressed: torch.Tensor, dense: torch.Tensor) -> None:
        if compressed.shape != dense.shape:
            raise ValueError(f"the dense model's layer input {tuple(dense.shape)} does not match the compressed "
                             f"chain's {tuple(compressed.shape)}")
        x = compressed.reshape(-1, self.in_features).to(self.total.device, self.dtype)
        y = dense.reshape(-1, self.in_features).to(self.total.device, self.dtype)
        self.total.add_(x.T @ y)
        self.tokens += x.shape[0]


def group_statistics(block: nn.Module, index: int, groups: Sequence[Sequence[TargetLayer]],
                     hidden: list[torch.Tensor], inputs: BlockInputs, device: torch.device, *,
                     hessian_dtype: torch.dtype, ranks: Ranks, stop: bool,
                     partners: Sequence[list[torch.Tensor] | None] | None = None) -> list[Statistic]:
    """(H = mean xᵀx, C = mean xᵀx_d or None) per group from one pass over the calibration
    batches; C where the group has ``partners`` (the dense model's inputs x_d of the group, one
    per batch). ``stop`` ends each batch's forward at the (single) group's input."""
    partners = list(partners) if partners is not None else [None] * len(groups)
    accumulators = [HessianAccumulator(group[0].in_features, device=device, dtype=hessian_dtype) for group in groups]
    crosses = [None if partner is None else CrossAccumulator(group[0].in_features, device=device, dtype=hessian_dtype)
               for group, partner in zip(groups, partners)]

    def feeder(accumulator: HessianAccumulator, cross: CrossAccumulator | None, partner: list[torch.Tensor] | None):
        seen = iter(partner or ())

        def hook(_module: nn.Module, args: tuple) -> None:
            accumulator.add(args[0].detach())
            if cross is not None:
                cross.add_pair(args[0].detach(), next(seen))
            if stop:
                raise StopForward
        return hook

    handles = [block.get_submodule(group[0].relative).register_forward_pre_hook(feeder(acc, cross, partner))
               for group, acc, cross, partner in zip(groups, accumulators, crosses, partners)]
    dtype = next(block.parameters()).dtype
    try:
        with torch.no_grad():
            for states in hidden:
                run_until_stopped(run_block, block, states, inputs.call(index, states.shape[0]), device, dtype)
    finally:
        for handle in handles:
            handle.remove()
    ranks.sum_hessians(accumulators, f"block {index}")
    present = [cross for cross in crosses if cross is not None]
    if present:
        ranks.sum_hessians(present, f"block {index} (dense targets)")
    for group, acc in zip(groups, accumulators):
        if acc.tokens == 0:
            raise RuntimeError(f"{group[0].name} never ran when its block was called; its registry entry is wrong")
    return [(acc.hessian, None if cross is None else cross.hessian) for acc, cross in zip(accumulators, crosses)]
