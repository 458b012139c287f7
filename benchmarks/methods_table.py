"""Perplexity of every compression method on one model, in one table (the paper's Table 1 setting).

Rows: dense, magnitude, Wanda, SparseGPT, OATS, HASSLE-free (Adam P2), HASSLE-free-exact and
HASSLE-free-fast, each compressing every linear layer of every decoder block of a freshly loaded model, in two
settings:

  (a) 2:4 + rank 64 for the sparse + low-rank methods; the pruning-only baselines run at 2:4
      with rank 0 (they store fewer parameters);
  (b) 2:8 with compression ratio rho = 0.5 for the sparse + low-rank methods (per-layer rank
      from the rho formula), the pruning baselines at 4:8 and 2:4 (50 %: the same budget).

A method name may end in ``+match``: the same method with block-output matching
(``--match-epochs/--match-lr/--match-target``). Columns: WikiText-2, PTB and C4 perplexity
(SparseGPT protocol) and the parameters stored by the compressed linear layers. Calibration: random C4 windows from documents 1100-1999. Each finished
row is kept as a small JSON file under benchmarks/results/methods_table_rows/ (keyed by its
settings, not by the code: --fresh after changing the code), so a rerun of the same command, even
in a later checkout, skips it and a long table can be filled in several sittings. The table goes
to stdout, one JSON line to benchmarks/results/methods_table.jsonl (or --results).

    python benchmarks/methods_table.py --model smollm2 --nsamples 128 --seqlen 2048 --dtype bfloat16 \
        --methods dense sparsegpt oats hassle-free-fast hassle-free-fast+match --settings a

``--iterations`` (default: each preset's own) applies to every sparse + low-rank row.
``--reuse DIR ...`` takes rows from finished ``hasslefree compress`` output directories
whose run matches the row (method, pattern, rank, calibration, dtype, matching) instead of
compressing again; the compressed model is loaded from DIR and evaluated.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import hasslefree as hf
from hasslefree.checkpoint import load_compressed
from hasslefree.data import calibration_batch, eval_max_windows, eval_tokens
from hasslefree.loading import load_model
from hasslefree.perplexity import model_context_length, perplexity
from hasslefree.pipeline.resume import tensor_digest
from methods_table_format import DATASETS, MATCH, MODEL_NOTES, SETTINGS, header, table
from hasslefree.pipeline import DEFAULT_SKIP, MatchOptions, compress, prepare

logger = logging.getLogger("methods_table")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "methods_table.jsonl"
CACHE = ROOT / "benchmarks" / "results" / "methods_table_rows"
METHODS = ["dense", "magnitude", "wanda", "sparsegpt", "oats", "hassle-free", "hassle-free-exact", "hassle-free-fast"]



def base_method(method: str) -> str:
    return method.removesuffix(MATCH)


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
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rank_argument(rank: int | str) -> int | hf.RankPolicy:
    return hf.RankPolicy.compression(float(rank.split("=")[1])) if isinstance(rank, str) else rank


def dense_parameters(model: torch.nn.Module, skip: list[str]) -> int:
    """Weights of the linear layers the pipeline compresses (the same set for every method)."""
    plan = prepare(model, pattern="2:4", rank=0, method="magnitude", skip=[*DEFAULT_SKIP, *skip])
    return sum(t.out_features * t.in_features for t in plan.layers)


def evaluate(model: torch.nn.Module, tokens: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for name, ids in tokens.items():
        limits = [w for w in (eval_max_windows(name), args.eval_windows) if w is not None]
        out[name] = perplexity(model, ids, args.eval_seqlen, max_windows=min(limits) if limits else None)
    return out


def run_row(row: dict[str, Any], calibration: torch.Tensor, tokens: dict[str, torch.Tensor],
            args: argparse.Namespace, reuse: Path | None = None) -> dict[str, Any]:
    """Load the model fresh, compress it as the row says (or load it from ``reuse``), evaluate it."""
    began = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    result: dict[str, Any] = {"load_s": time.perf_counter() - began,
                              "dense_parameters": dense_parameters(model, args.skip)}
    if row["method"] == "dense":
        result.update(parameters=result["dense_parameters"], ranks=None, compress_s=0.0)
    elif reuse is not None:
        report = json.loads((reuse / "report.json").read_text())
        model = load_compressed(reuse)
        ranks = [layer["rank"] for layer in report["layers"]]
        result.update(parameters=report["parameters"], ranks=[min(ranks), max(ranks)],
                      compress_s=report["timings"]["total"], reused=str(reuse))
    else:
        began = time.perf_counter()
        match = match_options(row, args)
        prunes = hf.PRESETS[base_method(row["method"])].prunes_only
        report = compress(model, tok, calibration=calibration, pattern=row["pattern"], rank=rank_argument(row["rank"]),
                          method=base_method(row["method"]), iterations=None if prunes else args.iterations,
                          seed=args.seed,
                          skip=[*DEFAULT_SKIP, *args.skip], progress=False, match=match,
                          activation_dtype=getattr(torch, args.dtype))
        ranks = [layer.rank for layer in report.layers]
        result.update(parameters=report.parameters, ranks=[min(ranks), max(ranks)],
                      compress_s=time.perf_counter() - began, timings=report.timings)
    began = time.perf_counter()
    result["ppl"] = evaluate(model.to(getattr(torch, args.eval_dtype)), tokens, args)
    result["eval_s"] = time.perf_counter() - began
    return result


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
            and config.get("match") == (match.to_dict() if match else None))


def _policy_text(rank: int | str) -> str:
    """The rank as a run's report.json records it."""
    from hasslefree.pipeline.plan import as_rank_policy, policy_text

    return policy_text(as_rank_policy(rank_argument(rank)))


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        choices=["dense", *hf.PRESETS, *(m + MATCH for m in hf.PRESETS)])
    parser.add_argument("--settings", nargs="+", default=["a", "b"], choices=list(SETTINGS))
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    parser.add_argument("--iterations", type=int, default=None,
                        help="alternating iterations of every S + LR row (default: each preset's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype while compressing (forward passes, stored activations)")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--match-epochs", type=int, default=1, help="matching epochs of the +match rows")
    parser.add_argument("--match-lr", type=float, default=1e-4)
    parser.add_argument("--match-target", choices=("block", "model"), default="model")
    parser.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="DIR",
                        help="finished `hasslefree compress` directories to take matching rows from")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window (capped at the context)")
    parser.add_argument("--eval-windows", type=int, default=None, help="first N windows per dataset (default all)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--rank", type=int, default=64, help="rank in setting (a)")
    parser.add_argument("--rho", type=float, default=0.5, help="compression ratio in setting (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="+", default=[], metavar="REGEX", help="also leave these layers dense")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file to append the record to")
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder of finished rows")
    parser.add_argument("--fresh", action="store_true", help="recompute cached rows (do after changing the code)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hasslefree").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model, tok = load_model(args.model)
    context = model_context_length(model)
    if context is not None and args.eval_seqlen > context:
        logger.info("eval seqlen %d capped at the model's context %d", args.eval_seqlen, context)
        args.eval_seqlen = context
    rows = [r for s in args.settings for r in rows_for(s, list(dict.fromkeys(args.methods)), args)]
    if "dense" in args.methods:  # one dense row, first
        rows = [next(r for r in rows if r["method"] == "dense")] + [r for r in rows if r["method"] != "dense"]
    for row in rows:  # every row's settings checked before the first (expensive) one runs
        try:
            if row["method"] != "dense":
                prepare(model, pattern=row["pattern"], rank=rank_argument(row["rank"]), method=base_method(row["method"]),
                        skip=[*DEFAULT_SKIP, *args.skip])
        except ValueError as error:
            parser.error(f"{row['method']} {row['pattern']} rank {row['rank']}: {error}")
    del model
    calibration = calibration_batch(tok, "c4", args.nsamples, args.seqlen, args.seed)
    tokens = {d: eval_tokens(tok, d, seqlen=args.eval_seqlen) for d in args.datasets}
    args.cache.mkdir(parents=True, exist_ok=True)

    done: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows, 1):
        key = row_key(row, args)
        path = args.cache / f"{key}.json"
        if key in done:
            logger.info("[%d/%d] %s %s rank %s: same row as above", i, len(rows), row["method"], row["pattern"],
                        row["rank"])
        elif path.exists() and not args.fresh:
            done[key] = json.loads(path.read_text())
            logger.info("[%d/%d] %s %s rank %s: cached (%s)", i, len(rows), row["method"], row["pattern"],
                        row["rank"], path.name)
        else:
            logger.info("[%d/%d] %s %s rank %s ...", i, len(rows), row["method"], row["pattern"], row["rank"])
            reuse = next((d for d in args.reuse if row["method"] != "dense" and reusable(d, row, calibration, args)),
                         None)
            if reuse is not None:
                logger.info("    reusing the finished run in %s", reuse)
            done[key] = run_row(row, calibration, tokens, args, reuse)
            done[key]["commit"] = _git("rev-parse", "--short", "HEAD")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done[key]))
            tmp.replace(path)
            logger.info("    %s  compress %.1f s, eval %.1f s", {d: round(p, 3) for d, p in done[key]["ppl"].items()},
                        done[key]["compress_s"], done[key]["eval_s"])
        row.update(done[key], key=key)

    print(header(args))
    print(table(rows, args))
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "node": platform.node(), "commit": _git("rev-parse", "--short", "HEAD"),
              "dirty_src": bool(_git("status", "--porcelain", "src")), "threads": torch.get_num_threads(),
              "command": " ".join(sys.argv), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
              "model_note": MODEL_NOTES.get(args.model.lower(), args.model),
              "wall_s": time.perf_counter() - started, "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
