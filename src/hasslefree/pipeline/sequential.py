"""The sequential pipeline (paper App. A.1, after SparseGPT): one block at a time.

For each block: accumulate the Hessian of every shared-input group from the calibration
activations, decompose the group's layers, swap them in, then run the compressed block to
produce the next block's inputs, so every layer is fitted to the outputs of the already
compressed layers before it. With ``true_sequential`` (the default) this holds inside a
block too: group g's Hessian is taken after groups < g are compressed, each pass stopping
at group g's input. Activations live on the CPU; one block at a time visits the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hasslefree.decompose import Decomposition
from hasslefree.nn import replace_linear
from hasslefree.pipeline.capture import BlockInputs, capture_block_inputs, rest_of_model_on, split_batches
from hasslefree.pipeline.block_passes import group_statistics, propagate
from hasslefree.pipeline.dense_targets import dense_pass, moved_targets
from hasslefree.pipeline.distributed import RankFailure, Ranks
from hasslefree.pipeline.layer_methods import LayerMethod, method_for
from hasslefree.pipeline.layers import layer_weight, write_dense
from hasslefree.pipeline.matching import MatchOptions, MatchRecord, match_block
from hasslefree.pipeline.plan import Plan, TargetLayer
from hasslefree.pipeline.progress import progress_bar
from hasslefree.pipeline.report import LayerRecord, StageTimer, cuda_peak_mb, peak_rss_mb
from hasslefree.pipeline.resume import ResumeStore

if TYPE_CHECKING:
    from hasslefree.loading.streaming import BlockWeights

logger = logging.getLogger(__name__)

BlockCallback = Callable[[int, list[LayerRecord]], None]


@dataclass
class PipelineOptions:
    """How the pipeline runs (the per-layer maths is in the plan and ``engine_options``)."""

    batch_size: int = 1
    true_sequential: bool = True
    write_modules: bool = True
    activation_dtype: torch.dtype = torch.float32
    hessian_dtype: torch.dtype = torch.float32
    seed: int = 0
    engine_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    match: MatchOptions = field(default_factory=MatchOptions)
    layer_target: str = "layer"  # "model": fit layers to the dense model's outputs (pipeline.dense_targets)
    ranks: Ranks = field(default_factory=Ranks)  # several: see hasslefree.pipeline.distributed


def run_sequential(model: nn.Module, plan: Plan, calibration: torch.Tensor, *, device: torch.device,
                   options: PipelineOptions, timer: StageTimer, store: ResumeStore | None = None,
                   on_block_end: BlockCallback | None = None,
                   weights: BlockWeights | None = None) -> tuple[list[LayerRecord], list[MatchRecord], int]:
    """Compress ``model`` in place; return the layer and matching records and how many blocks
    were resumed.

    With ``weights`` the blocks start on the meta device: each is read just before it is
    compressed and dropped once checkpointed in ``store`` (required then), so memory holds one
    block at a time.
    """
    blocks = plan.architecture.block_list(model)
    if weights is not None and store is None:
        raise ValueError("streaming the blocks needs an output directory to checkpoint them in")
    ranks = options.ranks
    if ranks.several:  # this rank's share of the windows, cut at batch boundaries
        calibration = torch.cat(ranks.shard(split_batches(calibration, options.batch_size)))
    resumed = ranks.agree(store.start(len(blocks)) if store is not None else 0, "the finished blocks")
    records = store.records() if store is not None else []
    matches = store.matches() if store is not None else []
    if resumed == len(blocks):
        if weights is None:
            with timer.stage("resume"):
                for index in range(resumed):
                    store.load_block(index, blocks[index])  # type: ignore[union-attr]
        return records, matches, resumed
    if resumed:
        logger.info("resuming after %d finished block(s) of %d", resumed, len(blocks))
    chain = (options.match.enabled and options.match.target == "model") or options.layer_target == "model"
    with rest_of_model_on(model, plan.architecture.blocks, device):
        with timer.stage("capture"):
            inputs = capture_block_inputs(model, blocks, calibration, batch_size=options.batch_size,
                                          device=device, dtype=options.activation_dtype, weights=weights)
        hidden = inputs.hidden
        dense_hidden = list(hidden) if chain else None  # the dense model's own block inputs
        with timer.stage("resume"):
            for index in range(resumed):
                if weights is not None:
                    weights.load(index, blocks[index])
                if dense_hidden is not None:  # the dense block, before its compressed state replaces it
                    dense_hidden = propagate(blocks[index], index, dense_hidden, inputs, device, options.activation_dtype)
                store.load_block(index, blocks[index])  # type: ignore[union-attr]
                hidden = propagate(blocks[index], index, hidden, inputs, device, options.activation_dtype)
                if weights is not None:
                    weights.release(blocks[index])
        bar = progress_bar(range(resumed, len(blocks)), options.progress, desc="blocks", total=len(blocks), initial=resumed)
        for index in bar:
            try:
                hidden, dense_hidden = _run_block(model, plan, index, hidden, dense_hidden, inputs, device, options,
                                                  timer, store, weights, records, matches, on_block_end)
            except Exception as exc:
                if ranks.several and not isinstance(exc, RankFailure):
                    logger.error("rank %d failed in block %d: %s", ranks.rank, index, exc)
                raise
    return records, matches, resumed


def _run_block(model: nn.Module, plan: Plan, index: int, hidden: list[torch.Tensor],
               dense_hidden: list[torch.Tensor] | None, inputs: BlockInputs, device: torch.device,
               options: PipelineOptions, timer: StageTimer, store: ResumeStore | None, weights: BlockWeights | None,
               records: list[LayerRecord], matches: list[MatchRecord],
               on_block_end: BlockCallback | None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Compress block ``index`` (after matching, if asked), checkpoint it; return the next block's
    inputs (and the dense model's, when matching chases them)."""
    blocks = plan.architecture.block_list(model)
    block = blocks[index]
    if weights is not None:
        with timer.stage("load"):
            weights.load(index, block)
    home = next(block.parameters()).device
    block.to(device)
    targets, dense_inputs, dense_hidden = _dense_side(block, index, plan.blocks[index], hidden, dense_hidden,
                                                      inputs, device, options, timer)
    block_records, layer_meta = _compress_block(block, index, plan.blocks[index], hidden, inputs,
                                                device, options, timer, dense_inputs)
    match = None
    if targets is not None:  # matching's last pass over the data is the propagation
        with timer.stage("match"):
            match, hidden = match_block(block, index, hidden, targets,
                                        lambda states: inputs.call(index, states.shape[0]), device,
                                        options.match, options.activation_dtype, options.ranks)
        matches.append(match)
    else:
        with timer.stage("propagate"):
            hidden = propagate(block, index, hidden, inputs, device, options.activation_dtype)
    block.to(home)
    if store is not None:
        with timer.stage("checkpoint"):
            store.save_block(index, block, layer_meta, block_records, len(blocks), match)
    if weights is not None:
        weights.release(block)
    records.extend(block_records)
    if block_records:
        worst = max(r.relative_objective for r in block_records)
        logger.info("block %d/%d: %d layers, worst relative error %.4g", index + 1, len(blocks),
                    len(block_records), worst)
    if on_block_end is not None:
        on_block_end(index, block_records)
    return hidden, dense_hidden


def _dense_side(block: nn.Module, index: int, groups: tuple[tuple[TargetLayer, ...], ...],
                hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor] | None, inputs: BlockInputs,
                device: torch.device, options: PipelineOptions, timer: StageTimer
                ) -> tuple[list[torch.Tensor] | None, list[list[torch.Tensor]] | None, list[torch.Tensor] | None]:
    """What the still dense block gives before it is compressed: the matching targets (or None),
    its layer inputs on the dense model's hidden states (``layer_target="model"``, else None) and
    the dense model's next hidden states (when they are followed)."""
    dtype = options.activation_dtype
    if dense_hidden is None:  # neither matching to the model nor layer_target="model"
        if not (options.match.enabled and groups):
            return None, None, None
        with timer.stage("match"):
            return propagate(block, index, hidden, inputs, device, dtype), None, None
    if not groups:  # nothing compressed here, but the dense model's hidden states still move on
        return None, None, propagate(block, index, dense_hidden, inputs, device, dtype)
    dense_inputs = None
    if options.layer_target == "model":
        with timer.stage("dense targets"):
            dense_inputs, dense_hidden = dense_pass(block, index, groups, dense_hidden, inputs, device, dtype)
    else:
        with timer.stage("match"):
            dense_hidden = propagate(block, index, dense_hidden, inputs, device, dtype)
    if not options.match.enabled:
        return None, dense_inputs, dense_hidden
    if options.match.target == "model":
        return dense_hidden, dense_inputs, dense_hidden
    with timer.stage("match"):  # the dense block on the compressed chain's inputs
        return propagate(block, index, hidden, inputs, device, dtype), dense_inputs, dense_hidden


def _compress_block(block: nn.Module, index: int, groups: tuple[tuple[TargetLayer, ...], ...],
                    hidden: list[torch.Tensor], inputs: BlockInputs, device: torch.device,
                    options: PipelineOptions, timer: StageTimer,
                    dense_inputs: list[list[torch.Tensor]] | None) -> tuple[list[LayerRecord], dict]:
    """Decompose every group of the block and swap the results in; ``dense_inputs`` (per group,
    per batch: the dense model's input of that group) asks for the moved targets of
    :mod:`hasslefree.pipeline.dense_targets`."""
    records: list[LayerRecord] = []
    meta: dict[str, dict[str, Any]] = {}
    layers = progress_bar(None, options.progress, desc=f"block {index} layers", total=sum(len(g) for g in groups), leave=False)
    partners = dense_inputs if dense_inputs is not None else [None] * len(groups)
    if options.true_sequential:
        schedule = [(group, None) for group in groups]
    else:
        with timer.stage("hessian"):
            statistics = group_statistics(block, index, groups, hidden, inputs, device, stop=False,
                                          partners=partners, **_statistics_options(options))
        schedule = list(zip(groups, statistics))
    for position, (group, statistic) in enumerate(schedule):
        if statistic is None:
            with timer.stage("hessian"):
                statistic = group_statistics(block, index, (group,), hidden, inputs, device, stop=True,
                                             partners=[partners[position]], **_statistics_options(options))[0]
        hessian, cross = statistic
        for target, result, method in _decompose(block, index, group, hessian, cross, device, options, timer):
            module = block.get_submodule(target.relative)
            with timer.stage("apply"):
                if options.write_modules:
                    replace_linear(block, target.relative, method.build_module(module, result, target.pattern))
                else:
                    write_dense(module, result.to_dense())
            records.append(_record(target, result, device))
            meta[target.relative] = {"module": options.write_modules}  # checkpointed through its codec
            layers.update(1)
        del hessian, cross, statistic
        partners[position] = None  # the dense inputs of a finished group are no longer needed
    layers.close()
    return records, meta


def _decompose(block: nn.Module, index: int, group: tuple[TargetLayer, ...], hessian: torch.Tensor,
               cross: torch.Tensor | None, device: torch.device, options: PipelineOptions,
               timer: StageTimer) -> list[tuple[TargetLayer, Any, LayerMethod]]:
    """(target, result, its method) for every layer of the group: one ``fit`` per set of layers
    that ask for the same settings (per rank, on its share of them, when there are several).
    With ``cross`` (C = mean x_cᵀx_d) each layer is fitted to its moved target W'."""
    moved = None
    if cross is not None:
        with timer.stage("dense targets"):
            moved = moved_targets({t.name: layer_weight(block.get_submodule(t.relative)).to(device, torch.float32)
                                   for t in group}, hessian, cross,
                                  percdamp=options.engine_options.get("percdamp", 0.01),
                                  coordinate_damp=options.engine_options.get("coordinate_damp", 0.0))
    by_settings: dict[Any, list[TargetLayer]] = {}
    for target in group:
        by_settings.setdefault(target.settings, []).append(target)
    solved: list[tuple[TargetLayer, Any, LayerMethod]] = []
    for settings, targets in by_settings.items():
        method = method_for(settings)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def fit(mine: list[TargetLayer], method: LayerMethod = method, settings: Any = settings) -> dict:
            return method.fit(block, mine, settings, hessian, device, seed=options.seed,
                              engine_options=options.engine_options, clock=timer.decompose_parts, weights=moved)

        results = options.ranks.solve(targets, fit, device, f"block {index}", stage=timer.stage)
        solved.extend((t, results[t], method) for t in targets)
    return solved


def _statistics_options(options: PipelineOptions) -> dict[str, Any]:
    return {"hessian_dtype": options.hessian_dtype, "ranks": options.ranks}


def _record(target: TargetLayer, result: Decomposition | Any, device: torch.device) -> LayerRecord:
    """The report line of any method's result (a Decomposition or an HSSResult answer the same)."""
    base = result.initial_objective
    best = result.history[result.best_iteration - 1]
    return LayerRecord(
        name=target.name, block=target.block, shape=(target.out_features, target.in_features),
        pattern=str(result.pattern), rank=result.rank, method=result.method,
        parameters=result.parameter_count, dense_parameters=target.out_features * target.in_features,
        relative_objective=best / base if base > 0 else 0.0,
        first_iterate_relative_objective=result.history[0] / base if base > 0 else 0.0,
        iterations=result.iterations, best_iteration=result.best_iteration, seconds=round(result.seconds, 4),
        peak_rss_mb=round(peak_rss_mb(), 1), cuda_peak_mb=cuda_peak_mb(device),
        damped_relative_objective=getattr(result, "damped_relative_objective", None),
    )
