"""Block-output matching on a model that is already compressed (``hasslefree match``).

The same per-block tuning as ``compress(..., match=...)`` (:mod:`hasslefree.pipeline.matching`),
run after the fact: the compressed blocks are tuned in order, each on the inputs the already
tuned blocks before it give, against the dense model's blocks. Matching settings can then be
tried, or matching added to any method's output (OATS, pruning only), without decomposing the
layers again. With an output directory every tuned block is checkpointed and a rerun resumes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hasslefree.architectures import resolve_architecture
from hasslefree.nn import SparseLowRankLinear
from hasslefree.pipeline.block_passes import propagate
from hasslefree.pipeline.capture import capture_block_inputs, rest_of_model_on
from hasslefree.pipeline.matching import MatchOptions, MatchRecord, match_block
from hasslefree.pipeline.progress import progress_bar
from hasslefree.pipeline.report import StageTimer
from hasslefree.pipeline.resume import ResumeStore, tensor_digest

logger = logging.getLogger(__name__)


@dataclass
class MatchRun:
    """What :func:`match_compressed` did: one record per block, stage seconds, blocks resumed."""

    matching: list[MatchRecord]
    timings: dict[str, float]
    resumed_blocks: int

    def to_dict(self) -> dict[str, Any]:
        return {"matching": [asdict(m) for m in self.matching], "timings": self.timings,
                "resumed_blocks": self.resumed_blocks}

    def mean_errors(self) -> tuple[float, float]:
        """Mean relative block output error over the blocks, before and after tuning."""
        count = max(len(self.matching), 1)
        return (sum(m.loss_before for m in self.matching) / count, sum(m.loss_after for m in self.matching) / count)

    def summary(self) -> str:
        if not self.matching:
            return "no block matched"
        before, after = self.mean_errors()
        kept = sum(m.kept for m in self.matching)
        return (f"matched {kept}/{len(self.matching)} blocks: mean relative output error "
                f"{before:.4g} -> {after:.4g} in {self.timings['total']:.0f} s")


def check_pair(model: nn.Module, dense: nn.Module) -> None:
    """A clear error unless ``dense`` is the model ``model`` was compressed from: same
    architecture and depth, same embeddings, and a dense layer of the same shape behind every
    compressed one; and unless there is something to tune."""
    arch, dense_arch = resolve_architecture(model), resolve_architecture(dense)
    blocks, dense_blocks = arch.block_list(model), dense_arch.block_list(dense)
    if arch.name != dense_arch.name or len(blocks) != len(dense_blocks):
        raise ValueError(f"the dense model ({dense_arch.name}, {len(dense_blocks)} blocks) is not the model this "
                         f"checkpoint was compressed from ({arch.name}, {len(blocks)} blocks)")
    ours, theirs = model.get_input_embeddings().weight, dense.get_input_embeddings().weight
    if ours.shape != theirs.shape or not torch.equal(ours.detach().to(theirs.dtype), theirs.detach()):
        raise ValueError("the dense model's token embeddings differ from the checkpoint's: pass the model it was "
                         "compressed from")
    found = 0
    for index, (block, dense_block) in enumerate(zip(blocks, dense_blocks)):
        for name, module in block.named_modules():
            if not isinstance(module, SparseLowRankLinear):
                continue
            found += 1
            try:
                counterpart = dense_block.get_submodule(name)
            except AttributeError:
                counterpart = None
            shape = (module.out_features, module.in_features)
            weight = getattr(counterpart, "weight", None)
            if weight is None or tuple(weight.shape) != shape:
                raise ValueError(f"block {index} {name}: the dense model has no {shape[0]} x {shape[1]} layer there")
    if not found:
        raise ValueError("the model has no SparseLowRankLinear layers to tune (load it with packed=False)")


def match_config(model: nn.Module, calibration: torch.Tensor, options: MatchOptions,
                 activation_dtype: torch.dtype, batch_size: int) -> dict[str, Any]:
    """Everything that changes the tuned model: hashed to guard resumes."""
    digest = tensor_digest(torch.cat([p.detach().reshape(-1)[:4096].float().cpu() for p in model.parameters()]))
    return {"source": digest, "calibration": {"shape": list(calibration.shape), "digest": tensor_digest(calibration)},
            "match": options.to_dict(), "activation_dtype": str(activation_dtype), "batch_size": batch_size}


def match_compressed(model: nn.Module, dense: nn.Module, calibration: torch.Tensor, *, options: MatchOptions,
                     device: str | torch.device | None = None, activation_dtype: torch.dtype | None = None,
                     batch_size: int = 1, out_dir: str | os.PathLike[str] | None = None,
                     progress: bool = True) -> MatchRun:
    """Tune ``model``'s SparseLowRankLinear layers in place, block by block, so each block's
    outputs match ``dense``'s (``options.target``: its block on the same inputs, or the dense
    model's own outputs). ``calibration`` is [n, seqlen] token ids; ``out_dir`` checkpoints
    each finished block there (``blocks/``, ``progress.json``) so a rerun resumes."""
    if not options.enabled:
        raise ValueError("matching needs epochs >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_pair(model, dense)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = activation_dtype or next(model.parameters()).dtype
    arch = resolve_architecture(model)
    blocks, dense_blocks = arch.block_list(model), resolve_architecture(dense).block_list(dense)
    store = None
    if out_dir is not None:
        store = ResumeStore(out_dir, match_config(model, calibration, options, dtype, batch_size))
    resumed = store.start(len(blocks)) if store is not None else 0
    records = store.matches() if store is not None else []
    timer = StageTimer()
    was_training = model.training
    model.eval()
    dense.eval()
    try:
        with rest_of_model_on(model, arch.blocks, device):
            with timer.stage("capture"):
                inputs = capture_block_inputs(model, blocks, calibration, batch_size=batch_size, device=device,
                                              dtype=dtype)
            hidden = inputs.hidden
            dense_hidden = list(hidden) if options.target == "model" else None
            bar = progress_bar(range(len(blocks)), progress, desc="matching blocks", total=len(blocks))
            for index in bar:
                block, dense_block = blocks[index], dense_blocks[index]
                if dense_hidden is not None:
                    with timer.stage("dense"):
                        dense_hidden = propagate(dense_block, index, dense_hidden, inputs, device, dtype)
                if index < resumed:
                    with timer.stage("resume"):
                        store.load_block(index, block)  # type: ignore[union-attr]
                        hidden = propagate(block, index, hidden, inputs, device, dtype)
                    continue
                if dense_hidden is not None:
                    targets = dense_hidden
                else:
                    with timer.stage("dense"):
                        targets = propagate(dense_block, index, hidden, inputs, device, dtype)
                home = next(block.parameters()).device
                block.to(device)
                with timer.stage("match"):
                    record, hidden = match_block(block, index, hidden, targets,
                                                 lambda states, i=index: inputs.call(i, states.shape[0]), device,
                                                 options, dtype)
                block.to(home)
                records.append(record)
                if store is not None:
                    tuned = {name: {"module": True} for name, m in block.named_modules()
                             if isinstance(m, SparseLowRankLinear)}
                    with timer.stage("checkpoint"):
                        store.save_block(index, block, tuned, [], len(blocks), record)
    finally:
        model.train(was_training)
    run = MatchRun(records, timer.summary(), resumed)
    logger.info("%s", run.summary())
    return run
