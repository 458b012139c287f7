"""Perplexity of every compression method on one model, in one table (the paper's Table 1 setting).

Rows: dense, magnitude, Wanda, SparseGPT, OATS, HASSLE-free (Adam P2), HASSLE-free-exact and
HASSLE-free-fast, each compressing every linear layer of every decoder block of a freshly loaded model, in two
settings:

  (a) 2:4 + rank 64 for the sparse + low-rank methods; the pruning-only baselines run at 2:4
      with rank 0 (they store fewer parameters);
  (b) 2:8 with compression ratio rho = 0.5 for the sparse + low-rank methods (per-layer rank
      from the rho formula), the pruning baselines at 4:8 and 2:4 (50 %: the same budget).

A method name may end in ``+match``: the same method with block-output matching
(``--match-epochs/--match-lr/--match-target``), and in ``+to-model`` (before any ``+match``): every
layer fitted to the dense model's outputs of that layer (``layer_target="model"``). Columns: WikiText-2, PTB and C4 perplexity
(SparseGPT protocol) and the parameters stored by the compressed linear layers. Calibration: random C4 windows from documents 1100-1999. Each finished
row is kept as a small JSON file under benchmarks/results/methods_table_rows/ (keyed by its
settings, not by the code: --fresh after changing the code), so a rerun of the same command, even
in a later checkout, skips it and a long table can be filled in several sittings; a row stopped
during its evaluation keeps its finished datasets (``<key>.partial``) and resumes at the next. The table goes
to stdout, one JSON line to benchmarks/results/methods_table.jsonl (or --results).

    python benchmarks/methods_table.py --model smollm2 --nsamples 128 --seqlen 2048 --dtype bfloat16 \
        --methods dense sparsegpt oats hassle-free-fast hassle-free-fast+match --settings a

``--iterations`` (default: each preset's own) applies to every sparse + low-rank row, ``--override``
(as in ``hasslefree compress``) to every compressed row.
``--tasks piqa hellaswag ...`` adds 0-shot accuracy columns (lm-eval on the local task files,
acc_norm where reported, full splits unless ``--limit``), kept in each row's file; a cached
row gets only its missing tasks computed, which needs its model (dense, or ``--reuse``).
``--reuse DIR ...`` takes rows from finished ``hasslefree compress`` output directories
whose run matches the row (method, pattern, rank, overrides, skips, calibration, dtype, matching) instead of
compressing again; the compressed model is loaded from DIR and evaluated.
"""

from __future__ import annotations

import argparse
import datetime
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
from hasslefree.calibration import calibration_batch
from hasslefree.cli_args import UsageError, parse_overrides
from hasslefree.data import eval_tokens
from hasslefree.loading import load_model
from hasslefree.loading.context import model_context_length
from hasslefree.zeroshot import PAPER_TASKS
from methods_table_format import DATASETS, MATCH, MODEL_NOTES, TO_MODEL, SETTINGS, header, table, zero_shot_table
from methods_table_rows import (add_zero_shot, base_method, missing_tasks, rank_argument, reusable, row_key,
                                rows_for, run_row, write_json)
from hasslefree.pipeline import DEFAULT_SKIP, prepare

logger = logging.getLogger("methods_table")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "methods_table.jsonl"
CACHE = ROOT / "benchmarks" / "results" / "methods_table_rows"
METHODS = ["dense", "magnitude", "wanda", "sparsegpt", "oats", "hassle-free", "hassle-free-exact", "hassle-free-fast"]



def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        choices=["dense", *(m + extra for m in hf.PRESETS
                                            for extra in ("", TO_MODEL, MATCH, TO_MODEL + MATCH))])
    parser.add_argument("--settings", nargs="+", default=["a", "b"], choices=list(SETTINGS))
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    parser.add_argument("--iterations", type=int, default=None,
                        help="alternating iterations of every S + LR row (default: each preset's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype while compressing (forward passes, stored activations)")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--match-epochs", type=int, default=1, help="matching epochs of the +match rows")
    parser.add_argument("--match-lr", type=float, default=3e-4)
    parser.add_argument("--match-target", choices=("block", "model"), default="model")
    parser.add_argument("--tasks", nargs="*", default=[], metavar="TASK",
                        help=f"0-shot tasks as extra columns (the paper's: {' '.join(PAPER_TASKS)})")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default all)")
    parser.add_argument("--zeroshot-batch-size", type=int, default=16)
    parser.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="DIR",
                        help="finished `hasslefree compress` directories to take matching rows from")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window (capped at the context)")
    parser.add_argument("--eval-windows", type=int, default=None, help="first N windows per dataset (default all)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--rank", type=int, default=64, help="rank in setting (a)")
    parser.add_argument("--rho", type=float, default=0.5, help="compression ratio in setting (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="+", default=[], metavar="REGEX", help="also leave these layers dense")
    parser.add_argument("--override", action="append", default=[], metavar="REGEX=key:value,...",
                        help="per-layer settings for every compressed row, as `hasslefree compress --override` "
                             "(e.g. a depth-dependent rank); part of the row's cache key")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file to append the record to")
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder of finished rows")
    parser.add_argument("--fresh", action="store_true", help="recompute cached rows (do after changing the code)")
    args = parser.parse_args(argv)
    try:
        args.overrides = parse_overrides(args.override)
    except UsageError as error:
        parser.error(str(error))
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
                        overrides=args.overrides, skip=[*DEFAULT_SKIP, *args.skip])
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
            missing = missing_tasks(done[key], args)
            if missing:
                add_zero_shot(done[key], row, missing, calibration, args, path)
        else:
            logger.info("[%d/%d] %s %s rank %s ...", i, len(rows), row["method"], row["pattern"], row["rank"])
            reuse = next((d for d in args.reuse if row["method"] != "dense" and reusable(d, row, calibration, args)),
                         None)
            if reuse is not None:
                logger.info("    reusing the finished run in %s", reuse)
            partial = path.with_suffix(".partial")
            if args.fresh:  # recomputed from scratch: no datasets from an earlier evaluation
                partial.unlink(missing_ok=True)
            done[key] = run_row(row, calibration, tokens, args, reuse, partial)
            done[key]["commit"] = _git("rev-parse", "--short", "HEAD")
            write_json(path, done[key])
            partial.unlink(missing_ok=True)
            logger.info("    %s  compress %.1f s, eval %.1f s", {d: round(p, 3) for d, p in done[key]["ppl"].items()},
                        done[key]["compress_s"], done[key]["eval_s"])
        row.update(done[key], key=key)

    print(header(args))
    print(table(rows, args))
    if args.tasks:
        print()
        print(zero_shot_table(rows, args))
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "node": platform.node(), "commit": _git("rev-parse", "--short", "HEAD"),
              "dirty_src": bool(_git("status", "--porcelain", "src")), "threads": torch.get_num_threads(),
              "command": " ".join(sys.argv), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
              "model_note": MODEL_NOTES.get(args.model.lower(), args.model),
              "wall_s": time.perf_counter() - started, "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    main()
