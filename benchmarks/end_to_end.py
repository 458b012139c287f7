"""Wall time of one whole `hasslefree compress` run, split by stage, from its report.json.

Runs the command below (or reads the report of a run already made, with --report), prints the
per-stage table (calibration capture, block forward passes for the Hessians and for
propagation, Hessian accumulation, decomposition with its P1 / P2 / objective parts) and
appends it to benchmarks/results/end_to_end.jsonl.

    python benchmarks/end_to_end.py -- smollm2 --method hassle-free-fast --pattern 2:4 --rank 64 \\
        --nsamples 128 --seqlen 2048 --dtype bfloat16 --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from results_log import append_record

logger = logging.getLogger("end_to_end")

# report.json timing keys -> table rows, in pipeline order
ROWS = [("load", "read streamed blocks"), ("capture", "capture block-0 inputs (embeddings only)"),
        ("hessian", "block forward passes + Hessian accumulation"),
        ("decompose", "decomposition (all layers)"), ("decompose.prepare", "  H damping / Cholesky / inverse"),
        ("decompose.P1", "  P1 (sparse step)"), ("decompose.P2", "  P2 (low-rank step)"),
        ("decompose.objective", "  objective of every iterate"), ("apply", "swap in compressed modules"),
        ("match", "block-output matching (targets, training, output pass)"),
        ("propagate", "propagation forward passes"), ("checkpoint", "per-block checkpoints"),
        ("resume", "resume"), ("assemble", "assemble streamed model")]


def stage_table(report: dict, wall: float | None) -> str:
    timings = report["timings"]
    lines = ["| stage | seconds | share of the run |", "|---|---|---|"]
    total = timings.get("total", 0.0)
    for key, label in ROWS:
        if timings.get(key):
            lines.append(f"| {label} | {timings[key]:.1f} | {100 * timings[key] / total:.1f} % |")
    lines.append(f"| pipeline total | {total:.1f} | 100 % |")
    if wall is not None:
        lines.append(f"| command wall time (incl. loading the model and data, writing the output) | {wall:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="read DIR/report.json of a finished run instead of running")
    parser.add_argument("--wall", type=float, help="with --report: the run's measured wall seconds")
    parser.add_argument("--command", help="with --report: the command line that made the run")
    parser.add_argument("compress_args", nargs=argparse.REMAINDER, help="arguments after -- go to hasslefree compress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = [a for a in args.compress_args if a != "--"]
    if args.report is None:
        if "--out" not in command:
            parser.error("pass the compress arguments after --, including --out DIR")
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hasslefree.cli", "compress", *command, "-q"], check=True)
        wall = time.perf_counter() - began
        directory = Path(command[command.index("--out") + 1])
    else:
        wall, directory = args.wall, args.report
        command = [args.command] if args.command else []
    report = json.loads((directory / "report.json").read_text())
    layers = report["layers"]
    worst = max(layers, key=lambda r: r["relative_objective"])
    print(stage_table(report, wall))
    print(f"\n{len(layers)} layers, peak RSS {report['peak_rss_mb']:.0f} MB, worst relative error "
          f"{worst['relative_objective']:.4g} ({worst['name']})")
    append_record("end_to_end", {"compress": command or report.get("config"), "wall_s": wall,
                                 "timings": report["timings"], "peak_rss_mb": report["peak_rss_mb"],
                                 "layers": [{k: r[k] for k in ("name", "relative_objective", "iterations", "seconds")}
                                            for r in layers]})


if __name__ == "__main__":
    main()
