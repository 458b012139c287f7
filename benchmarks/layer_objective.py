"""Layer objective of every preset on real activations (the paper's Figure 1 setting).

For each linear layer of one decoder block: relative objective f/f(0) and seconds per
preset, as a table (stdout), a JSON line appended to benchmarks/results/layer_objective.jsonl
and a bar plot PNG.

    python benchmarks/layer_objective.py --model smollm2 --block 0 --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import hasslefree as hf
from block_hessians import LLAMA_LAYERS, block_problems
from results_log import RESULTS, append_record

DEFAULT_METHODS = ["magnitude", "wanda", "sparsegpt", "alps", "magnitude-svd", "oats", "hassle-free",
                   "hassle-free-exact", "hassle-free-fast", "hassle-free-alps"]


def run(args: argparse.Namespace) -> list[dict]:
    problems = block_problems(args.model, args.block, args.nsamples, args.seqlen, args.seed)
    rows = []
    for method in args.methods:
        rank = 0 if hf.PRESETS[method].prunes_only else args.rank
        for name in LLAMA_LAYERS:
            weight, hessian = problems[name]
            result = hf.decompose_layer(weight, hessian, args.pattern, rank, method,
                                        iterations=None if hf.PRESETS[method].prunes_only else args.iterations,
                                        seed=args.seed)
            rows.append({"method": method, "layer": name, "shape": list(weight.shape), "rank": rank,
                         "relative_objective": result.relative_objective(hessian),
                         "first_iterate": result.history[0] / result.initial_objective,
                         "best_iteration": result.best_iteration, "iterations": result.iterations,
                         "seconds": result.seconds})
            logging.info("%-18s %-18s f/f0 %.5f  %.1fs", method, name, rows[-1]["relative_objective"],
                         result.seconds)
    return rows


def table(rows: list[dict], methods: list[str]) -> str:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {(r["method"], r["layer"]): r for r in rows}
    lines = ["| method | " + " | ".join(l.split(".")[-1] for l in layers) + " | seconds |",
             "|---|" + "---|" * (len(layers) + 1)]
    for m in methods:
        values = [f"{cell[(m, l)]['relative_objective']:.3g}" for l in layers]
        seconds = sum(cell[(m, l)]["seconds"] for l in layers)
        lines.append(f"| {m} | " + " | ".join(values) + f" | {seconds:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {(r["method"], r["layer"]): r["relative_objective"] for r in rows}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([x + i * width for x in range(len(layers))], [cell[(m, l)] for l in layers], width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], [l.split(".")[-1] for l in layers])
    ax.set_yscale("log")
    ax.set_ylabel("relative layer error f / f(0)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(table(rows, args.methods))
    RESULTS.mkdir(exist_ok=True)
    stem = f"layer_objective_{args.model}_block{args.block}_{args.pattern.replace(':', 'of')}_r{args.rank}"
    plot(rows, args.methods, RESULTS / f"{stem}.png",
         f"{args.model} block {args.block}: {args.pattern} + rank {args.rank}, {args.iterations} iterations")
    append_record("layer_objective", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
