"""A plan for compressing Llama-3-8B and -70B across R ranks: per-block solve time, memory per
rank, bytes through the collectives, projected wall time.

Measured: the per-layer solve seconds of ``speed_layers.py`` on this CPU (the latest
``hassle-free-fast`` record per shape in benchmarks/results/speed_layers.jsonl; whole runs
projected there from one refresh cycle). Layer shapes without a record are projected from the
8B layer of the same kind by the cost model the owner assignment uses (out·in² + in³/16),
and marked so. Bytes and memory are counted from the shapes and what the code sends and
keeps. GPU time is a projection only: CPU seconds x (this CPU's measured float32 GEMM rate /
the ``--gpu-tflops`` assumed for the GPU).

    python benchmarks/distributed_plan.py --ranks 8
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from hasslefree.pipeline.distributed import assign_owners, shape_cost
from hasslefree.text_table import format_table
from results_log import RESULTS, append_record


@dataclass(frozen=True)
class Shape:
    name: str
    blocks: int
    hidden: int
    intermediate: int
    kv: int

    def groups(self) -> list[list[tuple[str, int, int]]]:
        """The true-sequential input groups of one block: (layer, out, in)."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return [[("q", h, h), ("k", kv, h), ("v", kv, h)], [("o", h, h)], [("gate", i, h), ("up", i, h)],
                [("down", h, i)]]


MODELS = [Shape("Llama-3-8B", 32, 4096, 14336, 1024), Shape("Llama-3-70B", 80, 8192, 28672, 1024)]
BASE = MODELS[0]


def measured_seconds(method: str) -> dict[str, float]:
    """Latest projected whole-run seconds per shape ("outxin") from speed_layers.jsonl."""
    found: dict[str, float] = {}
    path = RESULTS / "speed_layers.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        for row in json.loads(line).get("rows", []):
            if row.get("method") == method and "projected_run_seconds" in row:
                found[row["shape"]] = row["projected_run_seconds"]
    return found


def cpu_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - began) / 1e9


def layer_seconds(model: Shape, name: str, out: int, inp: int, measured: dict[str, float]) -> tuple[float, bool]:
    """(CPU seconds, measured?) of one layer's solve."""
    key = f"{out}x{inp}"
    if key in measured:
        return measured[key], True
    base = next(l for g in BASE.groups() for l in g if l[0] == name)
    base_key = f"{base[1]}x{base[2]}"
    if base_key not in measured:
        raise SystemExit(f"no {base_key} record in speed_layers.jsonl: run benchmarks/speed_layers.py first")
    return measured[base_key] * shape_cost(out, inp) / shape_cost(base[1], base[2]), False


def plan(model: Shape, ranks: int, measured: dict[str, float], nsamples: int, seqlen: int, rank: int) -> dict:
    groups = model.groups()
    seconds = {name: layer_seconds(model, name, o, i, measured) for g in groups for name, o, i in g}
    one = sum(s for s, _ in seconds.values())

    def makespan(layers: list[tuple[str, int, int]]) -> float:
        owners = assign_owners([shape_cost(o, i) for _, o, i in layers], ranks)
        return max(sum(seconds[l[0]][0] for l, r in zip(layers, owners) if r == k) for k in range(ranks))

    sequential = sum(makespan(g) for g in groups)  # true sequential: group after group
    together = makespan([l for g in groups for l in g])  # --no-true-sequential: every layer at once
    hessian_bytes = sum(g[0][2] ** 2 * 8 + 8 for g in groups)  # float64 sum + token count per group
    result_bytes = sum((2 * o * i + rank * (o + i)) * 4 for g in groups for _, o, i in g)  # W, S, U, V (float32)
    block_params = sum(o * i for g in groups for _, o, i in g)
    shard = -(-nsamples // ranks)
    activations = 2 * shard * seqlen * model.hidden * 2  # block inputs and outputs, bf16, this rank's windows
    widest = max(i for g in groups for _, _, i in g)
    largest = max((o * i, o, i) for g in groups for _, o, i in g)
    solve = 5 * widest ** 2 * 4 + 3 * largest[0] * 4  # H, its damped copy, Cholesky, two inverse factors; W, S, work
    memory = block_params * 2 + activations + widest ** 2 * 8 + solve
    return {"model": model.name, "blocks": model.blocks, "ranks": ranks, "measured_layers": sorted(
        n for n, (_, m) in seconds.items() if m), "layer_seconds": {n: s for n, (s, _) in seconds.items()},
            "block_seconds_one": one, "block_seconds_sequential": sequential, "block_seconds_together": together,
            "hessian_allreduce_bytes": hessian_bytes, "result_broadcast_bytes": result_bytes,
            "memory_per_rank_bytes": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--method", default="hassle-free-fast")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gpu-tflops", type=float, default=25.0,
                        help="ASSUMED sustained float32 rate of one GPU for the projection (not measured)")
    args = parser.parse_args()
    measured = measured_seconds(args.method)
    gflops = cpu_gflops()
    to_gpu = gflops / (args.gpu_tflops * 1000)
    rows = [plan(m, args.ranks, measured, args.nsamples, args.seqlen, args.rank) for m in MODELS]
    gib = 2 ** 30
    table = format_table(
        ["model", "layers measured", "block CPU s, 1 rank", f"block CPU s, {args.ranks} ranks (seq.)",
         "(all groups at once)", "Hessian all-reduce GiB/block", "result broadcast GiB/block", "memory/rank GiB",
         "projected GPU h, 1 rank", f"projected GPU h, {args.ranks} ranks"],
        [[r["model"], ",".join(r["measured_layers"]) or "none", r["block_seconds_one"],
          r["block_seconds_sequential"], r["block_seconds_together"], r["hessian_allreduce_bytes"] / gib,
          r["result_broadcast_bytes"] / gib, r["memory_per_rank_bytes"] / gib,
          r["blocks"] * r["block_seconds_one"] * to_gpu / 3600,
          r["blocks"] * r["block_seconds_sequential"] * to_gpu / 3600] for r in rows])
    print(f"{args.method}, 2:4 + rank {args.rank}, calibration {args.nsamples} x {args.seqlen}; this CPU "
          f"{gflops:.0f} GFLOP/s float32 GEMM; GPU assumed {args.gpu_tflops:.0f} TFLOP/s (projection)\n{table}")
    append_record("distributed_plan", {"args": vars(args), "cpu_gflops": gflops, "rows": rows})


if __name__ == "__main__":
    main()
