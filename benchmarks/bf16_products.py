"""bfloat16 matrix products on this CPU: torch's own, through float32 (hasslefree.cpu_bf16), and
plain float32, side by side for the shapes a SmolLM2 calibration pass multiplies.

    python benchmarks/bf16_products.py [--threads 2] [--repeats 5]

Prints a table and appends one JSON line to benchmarks/results/bf16_products.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hasslefree.cpu_bf16 import Float32Products, native_bf16

logger = logging.getLogger("bf16_products")
RESULTS = Path(__file__).parent / "results" / "bf16_products.jsonl"
# (rows, in, out): a 2048-token window through SmolLM2's q/o, gate/up and down projections, and the
# x V product of a rank-64 layer
SHAPES = [(4096, 576, 576), (4096, 576, 1536), (4096, 1536, 576), (4096, 1536, 64)]


def seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k, m in SHAPES:
        x, w = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
        v = w.t().contiguous()  # k × m, multiplied as x @ v (the x V of a low-rank branch)
        native = seconds(lambda: F.linear(x, w), args.repeats)
        native_xv = seconds(lambda: x @ v, args.repeats)
        with Float32Products():
            upcast = seconds(lambda: F.linear(x, w), args.repeats)
            upcast_xv = seconds(lambda: x @ v, args.repeats)
        xf, wf = x.float(), w.float()
        f32 = seconds(lambda: F.linear(xf, wf), args.repeats)
        rows.append({"shape": [n, k, m], "native_linear_ms": native * 1e3, "float32_products_linear_ms": upcast * 1e3,
                     "native_x_at_v_ms": native_xv * 1e3, "float32_products_x_at_v_ms": upcast_xv * 1e3,
                     "float32_ms": f32 * 1e3})
    lines = [f"bf16 products, {args.threads} thread(s), native bf16 support: {native_bf16()} "
             f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()})", "",
             "| rows × in → out | bf16 F.linear ms | via float32 ms | × | bf16 x @ V ms | via float32 ms | × | "
             "float32 F.linear ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, k, m = r["shape"]
        lines.append(f"| {n} × {k} → {m} | {r['native_linear_ms']:.1f} | {r['float32_products_linear_ms']:.1f} | "
                     f"{r['native_linear_ms'] / r['float32_products_linear_ms']:.1f}× | {r['native_x_at_v_ms']:.1f} | "
                     f"{r['float32_products_x_at_v_ms']:.1f} | "
                     f"{r['native_x_at_v_ms'] / r['float32_products_x_at_v_ms']:.1f}× | {r['float32_ms']:.1f} |")
    print("\n".join(lines))
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "processor": platform.processor(), "threads": args.threads, "native_bf16": native_bf16(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info("appended to %s", args.results)


if __name__ == "__main__":
    main()
