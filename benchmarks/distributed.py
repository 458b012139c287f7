"""Wall time of one compression in one process and across processes (torchrun, gloo), side by side.

Each variant is the same ``hasslefree compress`` run (``processes x threads``), started fresh;
the table shows the wall time of the whole command, the report's per-stage split (rank 0),
the speed-up over the first variant, and whether its compressed model is bit-identical to the
first variant's with the same thread count per process.

    python benchmarks/distributed.py --model smollm2 --nsamples 16 --seqlen 512 --variants 1x1 2x1 1x2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hasslefree.text_table import format_table
from results_log import append_record

logger = logging.getLogger("distributed")
STAGES = ("capture", "hessian", "decompose", "communicate", "apply", "propagate", "checkpoint")


def _variant(text: str) -> tuple[int, int]:
    processes, _, threads = text.partition("x")
    try:
        value = int(processes), int(threads)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a variant is PROCESSESxTHREADS (e.g. 2x1), got {text!r}") from None
    if min(value) < 1:
        raise argparse.ArgumentTypeError(f"processes and threads must be positive, got {text!r}")
    return value


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2")
parser.add_argument("--method", default="hassle-free-fast")
parser.add_argument("--pattern", default="2:4")
parser.add_argument("--rank", type=int, default=64)
parser.add_argument("--nsamples", type=int, default=16)
parser.add_argument("--seqlen", type=int, default=512)
parser.add_argument("--iterations", type=int, default=None)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--variants", nargs="+", type=_variant, default=[(1, 1), (2, 1), (1, 2)],
                    metavar="PxT", help="processes x threads per process")


def run_variant(args: argparse.Namespace, processes: int, threads: int, out: Path) -> dict:
    """One fresh compression; wall time of the whole command and rank 0's report."""
    command = ["compress", args.model, "--out", str(out), "--method", args.method, "--pattern", args.pattern,
               "--rank", str(args.rank), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--dtype", args.dtype, "-q"]
    if args.iterations:
        command += ["--iterations", str(args.iterations)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "hasslefree", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{processes}x{threads} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"processes": processes, "threads": threads, "wall_s": wall, "timings": report["timings"],
            "objective": sum(layer["relative_objective"] for layer in report["layers"])}


def main() -> None:
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows, states = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for processes, threads in args.variants:
            logger.info("%d process(es) x %d thread(s) ...", processes, threads)
            out = Path(scratch) / f"{processes}x{threads}"
            row = run_variant(args, processes, threads, out)
            state = load_file(out / "model.safetensors")
            same = states.get(threads)
            row["same_as_one_process"] = (None if same is None else
                                          same.keys() == state.keys() and all(torch.equal(same[k], state[k])
                                                                              for k in same))
            states.setdefault(threads, state)
            rows.append(row)
            logger.info("    %.1f s", row["wall_s"])
    base = rows[0]["wall_s"]
    table = format_table(
        ["processes x threads", "wall s", *STAGES, "speed-up", "bit-identical"],
        [[f"{r['processes']}x{r['threads']}", r["wall_s"], *(r["timings"].get(s, 0.0) for s in STAGES),
          f"{base / r['wall_s']:.2f}x", {None: "-", True: "yes", False: "no"}[r["same_as_one_process"]]]
         for r in rows])
    print(f"{args.model} {args.method} {args.pattern} rank {args.rank}, calibration {args.nsamples} x {args.seqlen}, "
          f"{args.dtype}; stages from rank 0's report (s)\n{table}")
    append_record("distributed", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
