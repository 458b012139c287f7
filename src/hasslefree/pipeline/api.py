"""``compress``: the one call that turns a causal LM into its sparse + low-rank version."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import asdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hasslefree.cpu_bf16 import float32_products_wanted
from hasslefree.decompose import check_numeric_options, check_solver_options, decompose_group, decompose_layer
from hasslefree.hss.options import HSSOptions
from hasslefree.patterns import SparsityPattern
from hasslefree.rank_policy import RankPolicy
from hasslefree.loading.context import check_seqlen, model_context_length
from hasslefree.pipeline.plan import (DEFAULT_SKIP, LayerSettings, Plan, as_rank_policy, build_plan, check_method,
                                      compile_skips, normalise_overrides, policy_text)
from hasslefree.architectures import resolve_architecture
from hasslefree.pipeline.distributed import Ranks
from hasslefree.pipeline.recipe import Recipe
from hasslefree.pipeline.report import PLOT_NAME, CompressionReport, StageTimer, cuda_peak_mb, peak_rss_mb
from hasslefree.pipeline.resume import ResumeStore, tensor_digest
from hasslefree.pipeline.sequential import BlockCallback, PipelineOptions, run_sequential

if TYPE_CHECKING:
    from hasslefree.loading.streaming import BlockWeights

logger = logging.getLogger(__name__)

_PIPELINE_SET = {"weight", "weights", "hessian", "pattern", "rank", "method", "iterations", "seed", "name"}


def check_options(*, pattern: str | SparsityPattern = "2:4", rank: int | RankPolicy | None = None,
                  method: str = "hassle-free", iterations: int | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None, skip: Sequence[str] = DEFAULT_SKIP,
                  engine_options: Mapping[str, Any] | None = None,
                  hss: HSSOptions | Mapping[str, Any] | None = None) -> None:
    """Every check of :func:`prepare` that needs no model, so a front end (the CLI) can reject
    bad settings before it loads anything."""
    check_method(method)
    if hss is not None:
        HSSOptions.from_value(hss)
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    known = (set(inspect.signature(decompose_layer).parameters) | set(inspect.signature(decompose_group).parameters))
    unknown = set(engine_options or {}) - (known - _PIPELINE_SET)
    if unknown:
        raise ValueError(f"unknown engine option(s) {', '.join(sorted(unknown))}; see hasslefree.decompose_layer")
    check_numeric_options(**{k: v for k, v in (engine_options or {}).items()
                             if k in ("percdamp", "coordinate_damp", "tolerance", "patience")})
    SparsityPattern.parse(pattern)
    as_rank_policy(rank)
    normalise_overrides(overrides)
    compile_skips(skip)


def prepare(model: nn.Module, *, pattern: str | SparsityPattern = "2:4", rank: int | RankPolicy | None = None,
            method: str = "hassle-free", iterations: int | None = None,
            overrides: Mapping[str, Mapping[str, Any]] | None = None,
            skip: Sequence[str] = DEFAULT_SKIP, engine_options: Mapping[str, Any] | None = None,
            hss: HSSOptions | Mapping[str, Any] | None = None) -> Plan:
    """Check every argument and every targeted layer; return the plan. Does no heavy work."""
    check_options(pattern=pattern, rank=rank, method=method, iterations=iterations, overrides=overrides, skip=skip,
                  engine_options=engine_options, hss=hss)
    hss_options = HSSOptions.from_value(hss) if hss is not None else None
    arch = resolve_architecture(model)
    defaults = LayerSettings(SparsityPattern.parse(pattern), as_rank_policy(rank), method, iterations, hss_options)
    plan = build_plan(model, arch, defaults, overrides, skip)
    options = dict(engine_options or {})
    for name in sorted({t.settings.method for t in plan.layers if not t.settings.is_hss}):
        check_solver_options(name, options.get("sparse_solver"), options.get("lowrank_solver"),
                             options.get("sparse_options"), options.get("lowrank_options"))
    hss_layers = [t for t in plan.layers if t.settings.is_hss]
    larger = [t for t in hss_layers
              if t.settings.hss.parameter_count((t.out_features, t.in_features)) >= t.out_features * t.in_features]
    if larger:
        logger.warning("%d HSS layer(s) would store at least as many values as their dense weight (e.g. %s, "
                       "%d x %d at outer rank %d); lower the outer rank or the leaf, or give an HSS budget",
                       len(larger), larger[0].name, larger[0].out_features, larger[0].in_features, larger[0].rank)
    if hss is not None and not hss_layers:
        raise ValueError("HSS options were given but no layer uses an HSS method (shss, shss-rcm, ...)")
    if hss_layers and len(hss_layers) == len(plan.layers):
        if rank is not None:
            raise ValueError("rank does not apply to HSS methods: give the HSS outer rank or budget instead")
        if iterations is not None:
            raise ValueError("iterations do not apply to HSS methods (the data-aware ones take HSS sweeps)")
    return plan


def check_calibration(model: nn.Module, calibration: torch.Tensor) -> torch.Tensor:
    """Token ids [n, seqlen] that fit the model's vocabulary and context, or a clear error."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty [nsamples, seqlen] tensor of token ids, got "
                         f"{getattr(calibration, 'shape', type(calibration).__name__)}")
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise ValueError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    context = model_context_length(model)
    if context is not None and calibration.shape[1] > context:
        raise ValueError(f"calibration seqlen {calibration.shape[1]} exceeds the model's context of {context} tokens")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is not None and (int(calibration.min()) < 0 or int(calibration.max()) >= vocab):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{int(calibration.min())}, "
                         f"{int(calibration.max())}]")
    return calibration.long().cpu()


def compress(
    model: nn.Module,
    tokenizer: Any = None,
    recipe: Recipe | Mapping[str, Any] | None = None,
    *,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_name: str | None = None,
    on_block_end: BlockCallback | None = None,
    block_weights: BlockWeights | None = None,
    **settings: Any,
) -> CompressionReport:
    """Compress every linear layer of ``model``'s decoder blocks in place; return the report.

    What to do is a :class:`~hasslefree.pipeline.recipe.Recipe` (or a mapping of its fields),
    or, equivalently, its fields as keywords (``pattern="2:4", rank=64, method=...``, with
    ``rank`` an int or a RankPolicy, dtypes as torch dtypes, and the engine options of
    :func:`hasslefree.decompose_layer` such as ``percdamp`` flat among them); not both. The
    report records the recipe (``report.recipe``), so a run can be repeated from it.

    ``rank`` None means 64 for sparse + low-rank methods and 0 for pruning-only ones
    (magnitude, wanda, sparsegpt, alps). ``overrides`` maps a regex on full layer names to
    any of ``pattern``/``rank``/``method``/``iterations``/``skip``, e.g.
    ``{"mlp.down_proj": {"rank": 32}}``. ``calibration`` ([n, seqlen] token ids) wins over
    ``calib``/``nsamples``/``seqlen``. Activations between blocks stay on the CPU in
    ``activation_dtype``; Hessians accumulate in ``hessian_dtype``. ``dense=True`` writes
    W_S + U Vᵀ into the original layers instead of swapping in SparseLowRankLinear. With ``out_dir``, every finished
    block is checkpointed and re-running the same call resumes; the report, its plot and
    the compressed model are written there. ``engine_options`` go to ``decompose_group``.
    Under ``torchrun`` (an initialised default process group), every rank calls ``compress``
    with the same arguments: the calibration batches are shared out, Hessians summed and the
    layers solved across ranks (:mod:`hasslefree.pipeline.distributed`); rank 0 alone writes
    ``out_dir``, which every host must see. ``block_weights`` (from :func:`hasslefree.loading.open_streaming`, which leaves the blocks
    on the meta device) streams the blocks in one at a time; it needs ``out_dir``, the final
    model is written there block by block too, and ``model``'s blocks stay on the meta device
    (load the result with :func:`hasslefree.checkpoint.load_compressed`).

    ``match`` (:class:`MatchOptions` or a mapping such as ``{"epochs": 2, "lr": 1e-4,
    "target": "model"}``) tunes each compressed block's kept sparse values and U, V so its
    outputs match the dense block's ("block") or the dense model's ("model"); see
    :mod:`hasslefree.pipeline.matching`. ``layer_target="model"`` fits every layer to the dense
    model's outputs of that layer rather than to the dense layer on the compressed chain's
    inputs, so each layer also corrects the error carried in (see
    :mod:`hasslefree.pipeline.dense_targets`).

    HSS methods (``shss``, ``shss-rcm``, ``shss-whitened``, ``shss-rcm-whitened``) replace a
    layer by :class:`hasslefree.hss.HSSLinear`, built as ``hss`` (:class:`HSSOptions` or a
    mapping such as ``{"sparsity": 0.3, "outer_rank": 512, "leaf": 256}``) says; as the run's
    ``method`` they target only each block's first input group (q/k/v), and through
    ``overrides`` (``{"q_proj": {"method": "shss-rcm"}}``) any layer. ``percdamp`` in
    ``engine_options`` also damps the data-aware HSS fit.
    """
    recipe = as_recipe(recipe, settings)
    pattern, rank, method, iterations = recipe.pattern, recipe.rank_policy(), recipe.method, recipe.iterations
    overrides, skip, seed, hss, match = recipe.overrides, recipe.skip, recipe.seed, recipe.hss, recipe.match
    batch_size, true_sequential, dense = recipe.batch_size, recipe.true_sequential, recipe.dense
    calib, nsamples, seqlen = recipe.calib, recipe.nsamples, recipe.seqlen
    activation_dtype, hessian_dtype = recipe.dtype("activation_dtype"), recipe.dtype("hessian_dtype")
    engine_options = recipe.engine.given()
    plan = prepare(model, pattern=pattern, rank=rank, method=method, iterations=iterations,
                   overrides=overrides, skip=skip, engine_options=engine_options, hss=hss)
    if block_weights is not None and out_dir is None:
        raise ValueError("streaming the blocks (block_weights) needs out_dir to checkpoint them in")
    if calibration is None:
        if tokenizer is None:
            raise ValueError("pass calibration token ids, or a tokenizer to build them from calib")
        from hasslefree.calibration import calibration_batch

        calibration = calibration_batch(tokenizer, calib, nsamples, check_seqlen(model, seqlen), seed)
    calibration = check_calibration(model, calibration)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    config = _run_config(model, plan, calibration, pattern, rank, method, iterations, overrides, skip, seed,
                         batch_size, true_sequential, dense, (activation_dtype, hessian_dtype), engine_options)
    if match.enabled:  # only then, so earlier runs still resume
        config["match"] = match.to_dict()
    if recipe.layer_target != "layer":  # likewise
        config["layer_target"] = recipe.layer_target
    if any(t.settings.is_hss for t in plan.layers):  # only then, so earlier runs still resume
        config["hss"] = HSSOptions.from_value(hss).to_dict()
        if all(t.settings.is_hss for t in plan.layers):
            config["pattern"], config["rank"] = "hss", "hss"
    ranks = Ranks.current()
    options = PipelineOptions(batch_size=batch_size, true_sequential=true_sequential, write_modules=not dense,
                              activation_dtype=activation_dtype, hessian_dtype=hessian_dtype, seed=seed,
                              engine_options=dict(engine_options), progress=progress and ranks.writes, match=match,
                              layer_target=recipe.layer_target, ranks=ranks)
    store = ResumeStore(out_dir, config, read_only=not ranks.writes) if out_dir is not None else None
    timer = StageTimer()
    was_training = model.training
    model.eval()
    try:
        records, matches, resumed = run_sequential(model, plan, calibration, device=device, options=options, timer=timer,
                                                   store=store, on_block_end=on_block_end, weights=block_weights)
        if block_weights is not None and dense:  # a plain HF folder needs the whole model in memory
            with timer.stage("assemble"):
                for index, block in enumerate(plan.architecture.block_list(model)):
                    store.load_block(index, block)  # type: ignore[union-attr]
    finally:
        model.train(was_training)
    report = CompressionReport(model=str(name), architecture=plan.architecture.name,
                               config={k: v for k, v in config.items() if k != "model"}, layers=records,
                               timings=timer.summary(), resumed_blocks=resumed, peak_rss_mb=round(peak_rss_mb(), 1),
                               cuda_peak_mb=cuda_peak_mb(device), matching=[asdict(m) for m in matches],
                               recipe=recipe.to_dict(), bf16_products=_bf16_products(device, activation_dtype))
    logger.info("%s", report.summary())
    if out_dir is not None and ranks.writes:
        streamed = None if block_weights is None or dense else _StreamedBlocks(plan.architecture.blocks, store,
                                                                                block_weights)
        _write_outputs(model, tokenizer, Path(out_dir), report, dense, streamed)
    return report


def _bf16_products(device: torch.device, activation_dtype: torch.dtype) -> str | None:
    """How this run's bf16 block forwards multiplied (the report's ``bf16_products``)."""
    if device.type != "cpu" or activation_dtype != torch.bfloat16:
        return None
    return "float32" if float32_products_wanted() else "native"


def as_recipe(recipe: Recipe | Mapping[str, Any] | None, settings: Mapping[str, Any]) -> Recipe:
    """The run's recipe from ``compress``'s ``recipe`` argument or its keyword settings."""
    if recipe is not None and settings:
        raise ValueError(f"pass either a recipe or the keyword settings ({', '.join(sorted(settings))}), not both")
    if recipe is None:
        return Recipe.from_settings(settings)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    raise ValueError(f"recipe must be a Recipe or a mapping of its fields, got {type(recipe).__name__}")


class _StreamedBlocks:
    """The finished blocks, read back one at a time from the run's checkpoints for the final save."""

    def __init__(self, path: str, store: ResumeStore, weights: BlockWeights) -> None:
        self.path, self.store, self.weights = path, store, weights

    def load(self, index: int, block: nn.Module) -> None:
        self.store.load_block(index, block)

    def release(self, block: nn.Module) -> None:
        self.weights.release(block)


def _run_config(model, plan, calibration, pattern, rank, method, iterations, overrides, skip, seed, batch_size,
                true_sequential, dense, dtypes, engine_options) -> dict[str, Any]:
    """Everything that changes the result (not the device): hashed to guard resumes."""
    hf_config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings().weight
    return {
        "model": {"architecture": plan.architecture.name, "class": type(model).__name__,
                  "config": hf_config.to_json_string(use_diff=False) if hf_config is not None else None,
                  "embeddings": tensor_digest(embeddings), "dtype": str(embeddings.dtype)},
        "calibration": {"shape": list(calibration.shape), "digest": tensor_digest(calibration)},
        "pattern": str(SparsityPattern.parse(pattern)), "rank": policy_text(as_rank_policy(rank)), "method": method,
        "iterations": iterations, "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
        "skip": list(skip), "seed": seed, "batch_size": batch_size, "true_sequential": true_sequential,
        "dense": dense, "activation_dtype": str(dtypes[0]), "hessian_dtype": str(dtypes[1]),
        "engine_options": dict(sorted(engine_options.items())),  # JSON values: the hash is canonical JSON
    }


def _write_outputs(model: nn.Module, tokenizer: Any, out_dir: Path, report: CompressionReport, dense: bool,
                   streamed: _StreamedBlocks | None = None) -> None:
    """The compressed model (checkpoint format, or a plain HF folder when dense), report and plot."""
    report.save(out_dir)
    report.plot(out_dir / PLOT_NAME)
    if dense:
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        return
    try:
        from hasslefree.checkpoint import save_compressed
    except ImportError:
        logger.warning("hasslefree.checkpoint is not available: the result is only in %s/blocks", out_dir)
        return
    save_compressed(model, out_dir, run_config=_checkpoint_config(report), tokenizer=tokenizer, blocks=streamed)


def _checkpoint_config(report: CompressionReport) -> dict[str, Any]:
    config = dict(report.config)
    config["rank_policy"] = config.get("rank")
    config["architecture"] = report.architecture
    config["model"] = report.model
    return config
