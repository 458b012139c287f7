"""Where a compressed model's perplexity is lost: ppl with only blocks 0..k-1 compressed.

Loads the dense model and a finished compressed directory, then for each k puts the first
k compressed blocks into the dense model (the rest stay dense) and measures perplexity, so
the ppl gap can be split by depth; next to each step's share of the gap stands the mean
relative layer error of the blocks it adds (from the run's report.json), so layer error can be
set against its perplexity cost. Prints a table and appends it to
benchmarks/results/depth_ablation.jsonl.

    python benchmarks/depth_ablation.py --model smollm2 --compressed OUT --ks 0 5 10 15 20 25 30 \\
        --dataset wikitext2 --windows 40
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from hasslefree.checkpoint import load_compressed
from hasslefree.data import eval_tokens
from hasslefree.loading import load_model
from hasslefree.perplexity import perplexity
from hasslefree.pipeline import resolve_architecture
from results_log import append_record

logger = logging.getLogger("depth_ablation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the dense model the directory was compressed from")
    parser.add_argument("--compressed", type=Path, required=True, help="a finished `hasslefree compress` directory")
    parser.add_argument("--ks", type=int, nargs="+", required=True, help="numbers of leading blocks to compress")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=None, help="first N windows (default all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    dtype = getattr(torch, args.dtype)
    dense, tok = load_model(args.model, dtype=dtype)
    compressed = load_compressed(args.compressed, packed=False).to(dtype)
    architecture = resolve_architecture(dense)
    dense_blocks, compressed_blocks = architecture.block_list(dense), architecture.block_list(compressed)
    if len(dense_blocks) != len(compressed_blocks) or max(args.ks) > len(dense_blocks) or min(args.ks) < 0:
        parser.error(f"the models have {len(dense_blocks)} and {len(compressed_blocks)} blocks; "
                     f"k must lie in [0, {len(dense_blocks)}]")
    originals = [copy.deepcopy(b) for b in dense_blocks] if min(args.ks) < max(args.ks) else list(dense_blocks)
    tokens = eval_tokens(tok, args.dataset, seqlen=args.seqlen)
    rows = []
    for k in sorted(set(args.ks)):
        for i in range(len(dense_blocks)):
            dense_blocks[i] = compressed_blocks[i] if i < k else originals[i]
        began = time.perf_counter()
        ppl = perplexity(dense, tokens, args.seqlen, max_windows=args.windows)
        rows.append({"k": k, "ppl": ppl, "seconds": time.perf_counter() - began})
        logger.info("blocks 0..%d compressed: ppl %.3f", k - 1, ppl)
    layers = json.loads((args.compressed / "report.json").read_text())["layers"]
    lines = [f"{args.dataset}, {'all' if args.windows is None else f'first {args.windows}'} windows of "
             f"{args.seqlen}, {args.dtype}; {args.compressed}", "",
             "| blocks compressed | ppl | share of the gap | step's share | mean layer error of the step's blocks |",
             "|---|---|---|---|---|"]
    first, last = rows[0]["ppl"], rows[-1]["ppl"]
    previous = rows[0]
    for row in rows:
        share = (row["ppl"] - first) / (last - first) if last != first else 0.0
        step = (row["ppl"] - previous["ppl"]) / (last - first) if last != first else 0.0
        errors = [layer["relative_objective"] for layer in layers if previous["k"] <= layer["block"] < row["k"]]
        row["step_layer_error"] = sum(errors) / len(errors) if errors else None
        label = "none" if row["k"] == 0 else f"0..{row['k'] - 1}"
        error = "—" if row["step_layer_error"] is None else f"{row['step_layer_error']:.4f}"
        lines.append(f"| {label} | {row['ppl']:.3f} | {100 * share:.0f} % | {100 * step:.0f} % | {error} |")
        previous = row
    print("\n".join(lines))
    append_record("depth_ablation", {"model": args.model, "compressed": str(args.compressed),
                                     "dataset": args.dataset, "windows": args.windows, "dtype": args.dtype,
                                     "rows": rows})


if __name__ == "__main__":
    main()
