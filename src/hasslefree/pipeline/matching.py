"""Block-output matching: tune a compressed block so its outputs match a target.

Each layer was fitted to its own inputs, one at a time; their errors add up inside the
block. After a block's layers are decomposed, Adam (cosine schedule) tunes the kept values
of every sparse part (support fixed, so the pattern stays exact) and every U, V so that
the compressed block's outputs on the calibration inputs match a target:

* ``"block"``: the dense block applied to the same (compressed-chain) inputs, which corrects
  the error made inside this block (3BASiL's transformer matching);
* ``"model"``: the dense model's own outputs of this block, which also corrects error
  carried in from the blocks before it.

``tune_all`` also tunes the block's other parameters (its norm weights, any layer left dense),
as 3BASiL's matching does.

Trained values live in float32 for the run (bfloat16 cannot hold small Adam steps); the
forward and backward passes run under autocast in the block's dtype when that is a
16-bit type the device multiplies natively. A run that ends with a higher loss than it
started with is undone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hasslefree.cpu_bf16 import native_bf16
from hasslefree.nn import SparseLowRankLinear
from hasslefree.pipeline.capture import Call, run_block
from hasslefree.pipeline.distributed import Ranks

logger = logging.getLogger(__name__)

MATCH_TARGETS = ("block", "model")


@dataclass(frozen=True)
class MatchOptions:
    """How block-output matching runs; ``epochs=0`` turns it off."""

    epochs: int = 0
    lr: float = 3e-4  # best at model level at 32 x 2048 and 128 x 2048 (README, Ablations)
    target: str = "block"
    accumulate: int = 1  # calibration batches per optimiser step
    final_lr_fraction: float = 0.2  # the cosine schedule ends at lr x this
    tune_all: bool = False  # also the block's other parameters (norm weights, any dense layer)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"match epochs must be an integer >= 0, got {self.epochs!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"match lr must be a finite number > 0, got {self.lr!r}")
        if self.target not in MATCH_TARGETS:
            raise ValueError(f"match target must be one of {', '.join(MATCH_TARGETS)}, got {self.target!r}")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"match accumulate must be an integer >= 1, got {self.accumulate!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"match final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction!r}")
        if not isinstance(self.tune_all, bool):
            raise ValueError(f"match tune_all must be True or False, got {self.tune_all!r}")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if not self.tune_all:  # left out when off, so the runs from before it existed still resume
            del values["tune_all"]
        return values


@dataclass
class MatchRecord:
    """One block's matching: relative output error ‖out − target‖² / ‖target‖² before and after."""

    block: int
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    kept: bool


CallFor = Callable[[torch.Tensor], Call]


def match_block(block: nn.Module, index: int, hidden: list[torch.Tensor], targets: list[torch.Tensor],
                call_for: CallFor, device: torch.device, options: MatchOptions,
                out_dtype: torch.dtype, ranks: Ranks = Ranks()) -> tuple[MatchRecord, list[torch.Tensor]]:
    """Tune ``block``'s SparseLowRankLinear layers in place so block(hidden) ≈ targets.

    Returns the record and the tuned block's outputs (on the CPU in ``out_dtype``), computed
    exactly as the pipeline propagates activations, so they serve as the next block's inputs.
    With several ``ranks`` each holds its share of the batches; losses and gradients are
    summed over all of them, so every rank ends with the same block.
    """
    began = time.perf_counter()
    dtype = next(block.parameters()).dtype
    layers = [m for m in block.modules() if isinstance(m, SparseLowRankLinear)]
    if not layers or not hidden:
        return MatchRecord(index, 0.0, 0.0, 0, 0.0, False), _outputs(block, hidden, call_for, device, dtype, out_dtype)
    frozen = {p: p.requires_grad for p in block.parameters()}
    layer_dtypes = [layer.sparse_weight.dtype for layer in layers]
    saved = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
    owned = {id(p) for layer in layers for p in layer.parameters()}
    others = ([p for p in block.parameters() if id(p) not in owned and p.is_floating_point()]
              if options.tune_all else [])
    others_saved = [(p.detach().clone(), p.dtype) for p in others]
    norm = sum(ranks.in_order([float(t.float().pow(2).sum()) for t in targets], "matching: the target norm"))
    before = _relative_error(_outputs(block, hidden, call_for, device, dtype, out_dtype), targets, norm, ranks)
    for layer in layers:
        layer.float()
    for p in others:
        p.data = p.data.float()
    masks = [layer.sparse_weight.detach() != 0 for layer in layers]
    params = [p for layer in layers for p in layer.parameters()] + others
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        steps = _train(block, hidden, targets, call_for, device, dtype, layers, masks, params, options, norm,
                       ranks)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for layer, layer_dtype in zip(layers, layer_dtypes):
                layer.to(layer_dtype)
            for p, (_, p_dtype) in zip(others, others_saved):
                p.data = p.data.to(p_dtype)
    outputs = _outputs(block, hidden, call_for, device, dtype, out_dtype)
    after = _relative_error(outputs, targets, norm, ranks)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for layer, state in zip(layers, saved):
                layer.load_state_dict(state)
            for p, (value, _) in zip(others, others_saved):
                p.data = value
        outputs = _outputs(block, hidden, call_for, device, dtype, out_dtype)
    seconds = time.perf_counter() - began
    logger.info("block %d matching: relative output error %.4g -> %.4g in %d steps (%.1f s)%s", index, before,
                after, steps, seconds, "" if kept else "; no gain, undone")
    return MatchRecord(index, before, after if kept else before, steps, round(seconds, 3), kept), outputs


def _train(block, hidden, targets, call_for, device, dtype, layers, masks, params, options: MatchOptions,
           norm: float, ranks: Ranks) -> int:
    optimizer = torch.optim.Adam(params, lr=options.lr)
    per_epoch = ranks.most(math.ceil(len(hidden) / options.accumulate), "matching: the step count")
    total = per_epoch * options.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total,
                                                          eta_min=options.lr * options.final_lr_fraction)
    scale = 1.0 / norm
    autocast = _autocast(device, dtype)
    steps = 0
    for _ in range(options.epochs):
        for start in range(0, per_epoch * options.accumulate, options.accumulate):
            optimizer.zero_grad(set_to_none=True)
            for states, target in zip(hidden[start:start + options.accumulate],
                                      targets[start:start + options.accumulate]):
                with autocast:
                    out = run_block(block, states, call_for(states), device, dtype)
                loss = (out.float() - target.to(device, torch.float32)).pow(2).sum() * scale
                loss.backward()
            ranks.sum_gradients(params, "matching: the gradient sum")
            for layer, mask in zip(layers, masks):
                layer.sparse_weight.grad.mul_(mask)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for layer, mask in zip(layers, masks):
                    layer.sparse_weight.mul_(mask)  # the support is fixed: the pattern stays exact
            steps += 1
    return steps


@torch.no_grad()
def _outputs(block, hidden, call_for, device, dtype, out_dtype) -> list[torch.Tensor]:
    """The block's outputs as the pipeline propagates them (block dtype, no autocast)."""
    return [run_block(block, states, call_for(states), device, dtype).to("cpu", out_dtype) for states in hidden]


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor], norm: float, ranks: Ranks) -> float:
    """‖outputs − targets‖² / ``norm`` (‖targets‖² over every rank's batches)."""
    error = sum(ranks.in_order([float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets)],
                               "matching: the output error"))
    return error / norm if norm > 0 else 0.0


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision in the block's own 16-bit dtype; plain float32 otherwise, and on CPUs
    without native bfloat16 arithmetic, where bf16 products are slower than float32 ones."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
        return contextlib.nullcontext()
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
