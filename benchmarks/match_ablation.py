"""What block-output matching settings buy at model level, on one finished compressed run.

Each variant (epochs, lr, target, batches per step) is run with ``match_compressed`` on a
fresh copy of the same compressed directory (the layers are not decomposed again), saved
under ``--work`` (so an interrupted variant resumes) and scored by perplexity; the source
itself is the ``none`` row. Prints a table and appends every finished row to
benchmarks/results/match_ablation.jsonl as it lands.

    python benchmarks/match_ablation.py --compressed runs/base32 --nsamples 32 --dtype bfloat16 \\
        --windows 30 --variants none e1-lr1e-4-model e4-lr1e-4-model e2-lr3e-4-model
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import torch

from hasslefree.checkpoint import load_compressed, save_compressed
from hasslefree.checkpoint.files import read_checkpoint_config
from hasslefree.calibration import calibration_batch
from hasslefree.data import eval_tokens
from hasslefree.loading import load_model
from hasslefree.perplexity import perplexity
from hasslefree.pipeline import MatchOptions
from hasslefree.pipeline.match_existing import match_compressed
from results_log import append_record

logger = logging.getLogger("match_ablation")

VARIANT = re.compile(r"^e(?P<epochs>\d+)-lr(?P<lr>[0-9.e-]+)-(?P<target>block|model)"
                     r"(?:-acc(?P<acc>\d+))?(?P<all>-all)?$")


def parse_variant(text: str) -> MatchOptions | None:
    """``none`` or ``e<epochs>-lr<lr>-<block|model>[-acc<batches per step>][-all]`` (-all: tune_all)."""
    if text == "none":
        return None
    found = VARIANT.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"variant {text!r}: use none or "
                                         "e<epochs>-lr<lr>-<block|model>[-acc<n>][-all]")
    return MatchOptions(epochs=int(found["epochs"]), lr=float(found["lr"]), target=found["target"],
                        accumulate=int(found["acc"] or 1), tune_all=bool(found["all"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", type=Path, required=True, help="a finished `hasslefree compress` directory")
    parser.add_argument("--model", default="smollm2", help="the dense model it was compressed from")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (use the run's own)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--windows", type=int, default=None, help="first N evaluation windows (default all)")
    parser.add_argument("--work", type=Path, default=Path("runs/match_ablation"), help="where tuned copies go")
    args = parser.parse_args(argv)
    try:
        variants = [(name, parse_variant(name)) for name in args.variants]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    dtype = getattr(torch, args.dtype)
    dense, tok = load_model(args.model, dtype=dtype)
    calibration = calibration_batch(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    tokens = eval_tokens(tok, args.dataset, seqlen=args.seqlen)
    source_method = (read_checkpoint_config(args.compressed).get("run_config") or {}).get("method")
    rows = []
    for name, options in variants:
        model = load_compressed(args.compressed, packed=False).to(dtype)
        row: dict = {"variant": name, "match_seconds": 0.0}
        if options is not None:
            out = args.work / f"{args.compressed.name}-{name}"
            began = time.perf_counter()
            run = match_compressed(model, dense, calibration, options=options, out_dir=out, progress=False)
            row["match_seconds"] = round(time.perf_counter() - began, 1)
            row["mean_block_error"] = list(run.mean_errors())
            row["resumed_blocks"] = run.resumed_blocks
            save_compressed(model, out, run_config={"method": source_method, "match": options.to_dict()},
                            tokenizer=tok)
        began = time.perf_counter()
        row["ppl"] = perplexity(model, tokens, args.seqlen, max_windows=args.windows)
        row["eval_seconds"] = round(time.perf_counter() - began, 1)
        logger.info("%s: ppl %.3f (matching %.0f s)", name, row["ppl"], row["match_seconds"])
        rows.append(row)
        append_record("match_ablation", {"compressed": str(args.compressed), "source_method": source_method,
                                         "nsamples": args.nsamples, "seqlen": args.seqlen, "dtype": args.dtype,
                                         "dataset": args.dataset, "windows": args.windows, **row})
        del model
    lines = [f"{args.dataset}, {'all' if args.windows is None else f'first {args.windows}'} windows of "
             f"{args.seqlen}, {args.dtype}; {args.compressed} ({source_method}), {args.nsamples} x {args.seqlen} "
             "calibration", "", "| matching | ppl | matching s | mean block error before → after |", "|---|---|---|---|"]
    for row in rows:
        errors = row.get("mean_block_error")
        error = "—" if errors is None else f"{errors[0]:.4f} → {errors[1]:.4f}"
        lines.append(f"| {row['variant']} | {row['ppl']:.3f} | {row['match_seconds']:.0f} | {error} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
