"""The methods table's rows: which rows a setting has, their cache keys, and computing one
(compress, or load a finished run, then perplexity and 0-shot accuracy)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import hasslefree as hf
from hasslefree.checkpoint import load_compressed
from hasslefree.data import eval_max_windows
from hasslefree.loading import load_model
from hasslefree.perplexity import perplexity
from hasslefree.pipeline import DEFAULT_SKIP, MatchOptions, compress, prepare
from hasslefree.pipeline.resume import tensor_digest
from hasslefree.zeroshot import zero_shot_rows
from methods_table_format import MATCH, TO_MODEL

logger = logging.getLogger("methods_table")


def base_method(method: str) -> str:
    return method.removesuffix(MATCH).removesuffix(TO_MODEL)


def layer_target(row: dict[str, Any]) -> str:
    return "model" if row["method"].removesuffix(MATCH).endswith(TO_MODEL) else "layer"


def rows_for(setting: str, methods: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The (method, pattern, rank) rows of one setting, in table order."""
    rows = []
    for method in methods:
        if method == "dense":
            rows.append({"method": "dense", "pattern": "dense", "rank": None})
        elif hf.PRESETS[base_method(method)].prunes_only:
            for pattern in (["2:4"] if setting == "a" else ["4:8", "2:4"]):
                rows.append({"method": method, "pattern": pattern, "rank": 0})
        else:
            rows.append({"method": method, "pattern": "2:4", "rank": args.rank} if setting == "a"
                        else {"method": method, "pattern": "2:8", "rank": f"rho={args.rho:g}"})
    return [dict(row, setting=setting) for row in rows]


def match_options(row: dict[str, Any], args: argparse.Namespace) -> MatchOptions | None:
    if not row["method"].endswith(MATCH):
        return None
    return MatchOptions(epochs=args.match_epochs, lr=args.match_lr, target=args.match_target)


def row_iterations(row: dict[str, Any], args: argparse.Namespace) -> int | None:
    """The iterations the row runs (None: the preset's own), as keyed and as shown."""
    preset = hf.PRESETS[base_method(row["method"])]
    return None if preset.prunes_only else (args.iterations or preset.iterations)


def row_key(row: dict[str, Any], args: argparse.Namespace) -> str:
    """Everything that changes a row's numbers; the setting only labels it. Options at their old
    defaults are left out, so rows cached before they existed keep their keys."""
    spec = {k: row[k] for k in ("method", "pattern", "rank")}
    spec.update({k: getattr(args, k) for k in ("model", "eval_seqlen", "eval_windows", "datasets", "skip")})
    if args.eval_dtype != "float32":
        spec["eval_dtype"] = args.eval_dtype
    if row["method"] != "dense":  # the dense row needs no calibration
        spec.update({k: getattr(args, k) for k in ("nsamples", "seqlen", "seed")})
        spec["iterations"] = row_iterations(row, args)
        if args.dtype != "float32":
            spec["dtype"] = args.dtype
        match = match_options(row, args)
        if match is not None:
            spec["match"] = match.to_dict()
        if layer_target(row) != "layer":
            spec["layer_target"] = layer_target(row)
        if args.overrides:
            spec["overrides"] = args.overrides
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rank_argument(rank: int | str) -> int | hf.RankPolicy:
    return hf.RankPolicy.compression(float(rank.split("=")[1])) if isinstance(rank, str) else rank


def dense_parameters(model: torch.nn.Module, skip: list[str]) -> int:
    """Weights of the linear layers the pipeline compresses (the same set for every method)."""
    plan = prepare(model, pattern="2:4", rank=0, method="magnitude", skip=[*DEFAULT_SKIP, *skip])
    return sum(t.out_features * t.in_features for t in plan.layers)


def evaluate(model: torch.nn.Module, tokens: dict[str, torch.Tensor], args: argparse.Namespace,
             partial: Path | None = None) -> dict[str, float]:
    """Perplexity per dataset. Each finished dataset is written to ``partial`` at once, so a row
    interrupted during its (hour-long on 2 cores) evaluation resumes at the next dataset."""
    kept = json.loads(partial.read_text()) if partial is not None and partial.exists() else {}
    out = {name: float(kept[name]) for name in tokens if name in kept}
    for name, ids in tokens.items():
        if name in out:
            logger.info("    %s %.3f kept from the interrupted evaluation (%s)", name, out[name], partial.name)
            continue
        limits = [w for w in (eval_max_windows(name), args.eval_windows) if w is not None]
        out[name] = perplexity(model, ids, args.eval_seqlen, max_windows=min(limits) if limits else None)
        if partial is not None:
            write_json(partial, out)
    return {name: out[name] for name in tokens}


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` so that a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def run_row(row: dict[str, Any], calibration: torch.Tensor, tokens: dict[str, torch.Tensor],
            args: argparse.Namespace, reuse: Path | None = None, partial: Path | None = None) -> dict[str, Any]:
    """Load the model fresh, compress it as the row says (or load it from ``reuse``), evaluate it
    (finished datasets kept in ``partial``)."""
    began = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    result: dict[str, Any] = {"load_s": time.perf_counter() - began,
                              "dense_parameters": dense_parameters(model, args.skip)}
    if row["method"] == "dense":
        result.update(parameters=result["dense_parameters"], ranks=None, compress_s=0.0)
    elif reuse is not None:
        report = json.loads((reuse / "report.json").read_text())
        model = load_compressed(reuse, packed=False)
        ranks = [layer["rank"] for layer in report["layers"]]
        result.update(parameters=report["parameters"], ranks=[min(ranks), max(ranks)],
                      compress_s=report["timings"]["total"], reused=str(reuse))
    else:
        began = time.perf_counter()
        match = match_options(row, args)
        prunes = hf.PRESETS[base_method(row["method"])].prunes_only
        report = compress(model, tok, calibration=calibration, pattern=row["pattern"], rank=rank_argument(row["rank"]),
                          method=base_method(row["method"]), iterations=None if prunes else args.iterations,
                          seed=args.seed, overrides=args.overrides,
                          skip=[*DEFAULT_SKIP, *args.skip], progress=False, match=match,
                          layer_target=layer_target(row), activation_dtype=getattr(torch, args.dtype))
        ranks = [layer.rank for layer in report.layers]
        result.update(parameters=report.parameters, ranks=[min(ranks), max(ranks)],
                      compress_s=time.perf_counter() - began, timings=report.timings)
    began = time.perf_counter()
    model = model.to(getattr(torch, args.eval_dtype))
    result["ppl"] = evaluate(model, tokens, args, partial)
    result["eval_s"] = time.perf_counter() - began
    if args.tasks:
        result["zeroshot"] = zero_shot_columns(model, tok, args.tasks, args)
    return result


def zero_shot_columns(model: torch.nn.Module, tok: Any, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """0-shot accuracy per task (acc_norm where reported), on the full splits unless --limit."""
    began = time.perf_counter()
    rows = zero_shot_rows(model, tok, tasks, batch_size=args.zeroshot_batch_size, limit=args.limit)
    return {"accuracy": {r.task: r.accuracy for r in rows if r.samples},
            "samples": {r.task: r.samples for r in rows if r.samples}, "limit": args.limit,
            "eval_dtype": args.eval_dtype, "seconds": time.perf_counter() - began}


def missing_tasks(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The asked-for tasks a cached row has no accuracy for (at this --limit and eval dtype)."""
    zs = result.get("zeroshot") or {}
    same = zs.get("limit") == args.limit and zs.get("eval_dtype") == args.eval_dtype
    return [t for t in args.tasks if not same or t not in zs.get("accuracy", {})]


def add_zero_shot(result: dict[str, Any], row: dict[str, Any], tasks: list[str], calibration: torch.Tensor,
                  args: argparse.Namespace, path: Path) -> None:
    """Fill a cached row's missing 0-shot columns when its model can be had without compressing
    again (dense, or a matching --reuse directory); the row file is rewritten."""
    if row["method"] == "dense":
        model, tok = load_model(args.model, dtype=getattr(torch, args.eval_dtype))
    else:
        reuse = next((d for d in args.reuse if reusable(d, row, calibration, args)), None)
        if reuse is None:
            logger.info("    no model for the 0-shot columns %s (pass its run with --reuse)", ", ".join(tasks))
            return
        model, tok = load_compressed(reuse, packed=False).to(getattr(torch, args.eval_dtype)), load_model(args.model)[1]
    found = zero_shot_columns(model, tok, tasks, args)
    zs = result.get("zeroshot") or {}
    if zs.get("limit") != args.limit or zs.get("eval_dtype") != args.eval_dtype:
        zs = {}
    result["zeroshot"] = {**found, "accuracy": {**zs.get("accuracy", {}), **found["accuracy"]},
                          "samples": {**zs.get("samples", {}), **found["samples"]},
                          "seconds": zs.get("seconds", 0.0) + found["seconds"]}
    write_json(path, result)


def reusable(directory: Path, row: dict[str, Any], calibration: torch.Tensor, args: argparse.Namespace) -> bool:
    """Whether a finished ``hasslefree compress`` run in ``directory`` is this row's run."""
    try:
        config = json.loads((directory / "report.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    match = match_options(row, args)
    pattern = str(hf.SparsityPattern.parse(row["pattern"]))
    iterations = args.iterations if args.iterations else None
    return (config.get("method") == base_method(row["method"]) and config.get("pattern") == pattern
            and config.get("rank") == _policy_text(row["rank"]) and config.get("iterations") == iterations
            and config.get("seed") == args.seed and config.get("calibration", {}).get("shape") == list(calibration.shape)
            and config.get("calibration", {}).get("digest") == tensor_digest(calibration)
            and config.get("activation_dtype") == f"torch.{args.dtype}"
            and config.get("match") == (match.to_dict() if match else None)
            and config.get("layer_target", "layer") == layer_target(row)
            and config.get("overrides", {}) == args.overrides
            and config.get("skip") == [*DEFAULT_SKIP, *args.skip])


def _policy_text(rank: int | str) -> str:
    """The rank as a run's report.json records it."""
    from hasslefree.pipeline.plan import as_rank_policy, policy_text

    return policy_text(as_rank_policy(rank_argument(rank)))
