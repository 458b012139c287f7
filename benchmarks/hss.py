"""Sparse + HSS against sparse + low rank at equal stored parameters, on real weights.

Three parts, one run (single-threaded; every number below comes from this script):

1. Layers: SmolLM2 q/k/v/o of a few blocks and every linear layer of stories260K. Per layer
   and budget, HSS (sparsity s, leaf, outer rank picked by bisection so that nonzeros of S +
   HSS values <= budget x dense) fixes the stored-value count P; every other method is sized
   to at most P: magnitude + SVD (the same magnitude S, then the truncated SVD of W - S with
   rank floor((P - nnz S) / (out + in))) and hassle-free-exact (unstructured, rank ratio
   kappa: rank floor(kappa P / (out + in)), nonzeros floor((1 - kappa) P), i.e.
   ``RankPolicy.rank_ratio(kappa, 1 - P / (out in))``). Reported: relative Frobenius error
   ||W - W_hat|| / ||W|| and relative layer objective f / f(0) with the calibration H.
2. Speed: HSSLinear forward vs dense ``nn.Linear`` at 1 and 2048 tokens.
3. Perplexity: SmolLM2 with q/k/v of every block replaced (the HSS paper's target) at two
   budgets, for the best Frobenius HSS variant, the best data-aware one and
   hassle-free-exact, vs dense, on the first ``--ppl-windows`` windows of WikiText-2 test.

Hessians come from one pass of the calibration windows (C4 for SmolLM2, the TinyStories
file for stories260K) through the *dense* model (not the sequential pipeline), so every
data-aware method sees the same H; they are cached under .cache/. Results: tables on stdout, a JSON line in benchmarks/results/hss.jsonl and
benchmarks/results/hss.png.

    python benchmarks/hss.py --nsamples 32 --seqlen 512 --ppl-windows 8
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hasslefree as hf
from hasslefree.calibration import calibration_batch
from hasslefree.data import eval_tokens
from hasslefree.hss import HSSOptions, compress_linear_hss, magnitude_sparse
from hasslefree.loading import find_data_file, load_model
from hasslefree.perplexity import perplexity

from block_hessians import input_hessians

RESULTS = Path(__file__).parent / "results"
CACHE = Path(".cache")
LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
QKV = LLAMA[:3]
# Layers that read the same input share one Hessian (hooked on the first of them).
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}
FROBENIUS = ["shss", "shss-rcm"]
DATA_AWARE = ["shss-whitened", "shss-rcm-whitened"]
METHODS = ["magnitude+svd", *FROBENIUS, *DATA_AWARE, "hassle-free-exact"]

log = logging.getLogger("hss-benchmark")


# ------------------------------------------------------------------ Hessians
def collect_hessians(model, tokenizer, spec: str, layers: dict[int, list[str]], args,
                     calib: str = "c4") -> dict[tuple[int, str], torch.Tensor]:
    """H = mean x x^T of every requested layer's input, from one dense pass (cached)."""
    wanted = sorted({(b, SHARED_INPUT.get(n, n)) for b, names in layers.items() for n in names})
    key = hashlib.sha1(f"{spec}|{wanted}|{args.nsamples}|{args.seqlen}|{args.seed}|{calib}".encode()).hexdigest()[:12]
    path = CACHE / f"hss_hessians_{key}.safetensors"
    if path.exists():
        stored = load_file(str(path))
        found = {(b, n): stored[f"{b}.{n}"] for b, n in wanted}
    else:
        began = time.perf_counter()
        windows = calibration_batch(tokenizer, calib, args.nsamples, args.seqlen, args.seed)
        modules = {(b, n): model.model.layers[b].get_submodule(n) for b, n in wanted}
        found = input_hessians(model, modules, windows, max(b for b, _ in wanted))
        CACHE.mkdir(exist_ok=True)
        save_file({f"{b}.{n}": h.contiguous() for (b, n), h in found.items()}, str(path))
        log.info("%s: %d Hessians from %d x %d tokens in %.0f s", spec, len(found), args.nsamples, args.seqlen,
                 time.perf_counter() - began)
    return {(b, n): found[(b, SHARED_INPUT.get(n, n))] for b, names in layers.items() for n in names}


# ------------------------------------------------------------------ one layer, one method
def objective(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    e = (w - approx).double()
    return float(((e @ h.double()) * e).sum())


def approximate(method: str, w: torch.Tensor, h: torch.Tensor, options: HSSOptions, budget: int, args):
    """(W_hat dense, stored values, seconds, detail) for one method at one budget."""
    out_f, in_f = w.shape
    began = time.perf_counter()
    if method == "magnitude+svd":
        sparse = magnitude_sparse(w, options.sparsity)
        rank = max(0, min((budget - sparse.nnz) // (out_f + in_f), min(w.shape)))
        residual = w.double() - sparse.to_dense().double()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        approx = sparse.to_dense().double() + (u[:, :rank] * s[:rank]) @ vh[:rank]
        return approx.float(), sparse.nnz + rank * (out_f + in_f), time.perf_counter() - began, {"rank": rank}
    if method in FROBENIUS or method in DATA_AWARE:
        layer = compress_linear_hss(w, sparsity=options.sparsity, outer_rank=options.outer_rank_for(w.shape),
                                    leaf=options.leaf, min_rank=options.min_rank, rank_decay=options.rank_decay,
                                    variant=method, hessian=h if method in DATA_AWARE else None)
        seconds = time.perf_counter() - began
        return layer.to_dense(), layer.parameter_count(include_bias=False), seconds, \
            {"outer_rank": layer.config["outer_rank"], "nnz": layer.s_values.numel()}
    rho = 1.0 - budget / (out_f * in_f)
    result = hf.decompose_layer(w, h, "unstructured:0.5", hf.RankPolicy.rank_ratio(args.kappa, rho), method,
                                iterations=args.hfe_iterations)
    return result.to_dense().float(), result.parameter_count, time.perf_counter() - began, \
        {"rank": result.rank, "nnz": result.pattern.nonzeros, "iterations": result.iterations}


def layer_rows(model_name: str, problems: dict, budgets: list[float], options: HSSOptions, args) -> list[dict]:
    rows = []
    for (block, name), (w, h) in problems.items():
        base = objective(w, torch.zeros_like(w), h)
        for frac in budgets:
            opts = HSSOptions(**{**options.to_dict(), "budget": frac, "outer_rank": None})
            budget = opts.parameter_count(tuple(w.shape))  # exact stored values of the HSS layers
            for method in METHODS:
                approx, params, seconds, detail = approximate(method, w, h, opts, budget, args)
                assert params <= budget, (method, params, budget)
                rows.append({"model": model_name, "block": block, "layer": name, "shape": list(w.shape),
                             "budget_fraction": frac, "budget_params": budget, "method": method,
                             "params": params, "params_over_dense": params / w.numel(),
                             "rel_frobenius": float((w - approx).norm() / w.norm()),
                             "rel_objective": objective(w, approx, h) / base, "seconds": seconds, **detail})
                log.info("%s %d %-18s %.2f %-18s fro %.4f f/f0 %.4f %.2fs", model_name, block, name, frac, method,
                         rows[-1]["rel_frobenius"], rows[-1]["rel_objective"], seconds)
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values))


def layer_table(rows: list[dict]) -> str:
    """Per model and budget: geometric means over layers of both errors (lower is better)."""
    lines = ["| model | budget | stored/dense | method | ||W-Ŵ||/||W|| | f/f(0) | s/layer |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for frac in dict.fromkeys(r["budget_fraction"] for r in rows if r["model"] == model):
            for method in METHODS:
                sel = [r for r in rows if r["model"] == model and r["budget_fraction"] == frac and r["method"] == method]
                ratio = sum(r["params"] for r in sel) / sum(math.prod(r["shape"]) for r in sel)
                lines.append(f"| {model} | {frac:g} | {ratio:.3f} | {method} | {geomean([r['rel_frobenius'] for r in sel]):.4f} | "
                             f"{geomean([r['rel_objective'] for r in sel]):.4f} | {statistics.mean(r['seconds'] for r in sel):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ speed
def time_call(fn, x, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def speed_rows(layers: dict[str, tuple[torch.Tensor, HSSOptions]]) -> list[dict]:
    rows = []
    for label, (w, options) in layers.items():
        layer = compress_linear_hss(w, sparsity=options.sparsity, outer_rank=options.outer_rank_for(w.shape),
                                    leaf=options.leaf, variant="shss-rcm")
        dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
        dense.weight.data = w.clone()
        for tokens, reps in ((1, 100), (2048, 5)):
            x = torch.randn(tokens, w.shape[1])
            t_dense = time_call(dense, x, reps)
            t_hss = time_call(layer, x, reps)
            t_s = time_call(lambda v: (layer.sparse_weight() @ v.T).T, x, reps)
            t_tree = time_call(layer.hss.matmul, x, reps)
            rows.append({"layer": label, "shape": list(w.shape), "tokens": tokens,
                         "outer_rank": layer.config["outer_rank"], "leaf": options.leaf,
                         "params_over_dense": layer.parameter_count() / w.numel(),
                         "dense_ms": 1e3 * t_dense, "hss_ms": 1e3 * t_hss, "sparse_part_ms": 1e3 * t_s,
                         "tree_part_ms": 1e3 * t_tree, "hss_over_dense": t_hss / t_dense})
            log.info("speed %s tokens %d: dense %.3f ms, HSS %.3f ms", label, tokens, 1e3 * t_dense, 1e3 * t_hss)
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| layer | shape | stored/dense | tokens | dense ms | HSS ms (S + tree) | HSS / dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['params_over_dense']:.2f} | {r['tokens']} | "
                     f"{r['dense_ms']:.3f} | {r['hss_ms']:.3f} ({r['sparse_part_ms']:.3f} + {r['tree_part_ms']:.3f}) | "
                     f"{r['hss_over_dense']:.1f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------ perplexity
def ppl_rows(model, tokenizer, hessians: dict, budgets: list[float], options: HSSOptions, variants: list[str],
             args) -> list[dict]:
    tokens = eval_tokens(tokenizer, "wikitext2", seqlen=2048)
    windows = min(args.ppl_windows, tokens.shape[-1] // 2048)

    def evaluate() -> tuple[float, float]:
        began = time.perf_counter()
        value = perplexity(model, tokens, 2048, max_windows=windows)
        return value, time.perf_counter() - began

    dense_ppl, seconds = evaluate()
    rows = [{"method": "dense", "budget_fraction": 1.0, "params_over_dense": 1.0, "ppl": dense_ppl,
             "windows": windows, "eval_seconds": seconds}]
    log.info("dense: ppl %.3f (%d windows, %.0f s)", dense_ppl, windows, seconds)
    originals = {(b, n): model.model.layers[b].get_submodule(n).weight.detach().clone()
                 for b in range(len(model.model.layers)) for n in QKV}
    for frac in budgets:
        opts = HSSOptions(**{**options.to_dict(), "budget": frac, "outer_rank": None})
        for method in [*variants, "hassle-free-exact"]:
            began = time.perf_counter()
            stored = dense_total = 0
            for (b, n), w in originals.items():
                budget = opts.parameter_count(tuple(w.shape))
                approx, params, _, _ = approximate(method, w, hessians[(b, n)], opts, budget, args)
                model.model.layers[b].get_submodule(n).weight.data.copy_(approx)
                stored += params
                dense_total += w.numel()
            build = time.perf_counter() - began
            value, seconds = evaluate()
            rows.append({"method": method, "budget_fraction": frac, "params_over_dense": stored / dense_total,
                         "ppl": value, "windows": windows, "build_seconds": build, "eval_seconds": seconds})
            log.info("%s budget %g: ppl %.3f (stored %.3f of q/k/v; build %.0f s)", method, frac, value,
                     stored / dense_total, build)
            for (b, n), w in originals.items():
                model.model.layers[b].get_submodule(n).weight.data.copy_(w)
    return rows


def ppl_table(rows: list[dict]) -> str:
    lines = ["| method | budget | stored/dense (q/k/v) | WikiText-2 ppl |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget_fraction']:g} | {r['params_over_dense']:.3f} | {r['ppl']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plot
def plot(layer: list[dict], ppl: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, f) for m in dict.fromkeys(r["model"] for r in layer)
              for f in dict.fromkeys(r["budget_fraction"] for r in layer if r["model"] == m)]
    fig, axes = plt.subplots(1, len(panels) + (1 if ppl else 0), figsize=(3.6 * (len(panels) + 1), 3.8))
    for ax, (model, frac) in zip(axes, panels):
        for i, key in enumerate(("rel_frobenius", "rel_objective")):
            values = [geomean([r[key] for r in layer if r["model"] == model and r["budget_fraction"] == frac
                               and r["method"] == m]) for m in METHODS]
            ax.bar([x + 0.4 * i for x in range(len(METHODS))], values, 0.4,
                   label=["‖W−Ŵ‖/‖W‖", "f/f(0)"][i])
        ax.set_xticks([x + 0.2 for x in range(len(METHODS))], METHODS, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{model}, budget {frac:g}", fontsize=9)
        ax.legend(fontsize=6, loc="lower left", framealpha=0.8)
    if ppl:
        ax = axes[-1]
        dense = next(r["ppl"] for r in ppl if r["method"] == "dense")
        methods = [m for m in dict.fromkeys(r["method"] for r in ppl) if m != "dense"]
        fracs = list(dict.fromkeys(r["budget_fraction"] for r in ppl if r["method"] != "dense"))
        for i, m in enumerate(methods):
            ax.bar([x + 0.8 / len(methods) * i for x in range(len(fracs))],
                   [next(r["ppl"] for r in ppl if r["method"] == m and r["budget_fraction"] == f) for f in fracs],
                   0.8 / len(methods), label=m)
        ax.axhline(dense, color="k", lw=0.8, ls="--", label="dense")
        ax.set_xticks([x + 0.4 - 0.4 / len(methods) for x in range(len(fracs))], [f"budget {f:g}" for f in fracs])
        ax.set_title(f"SmolLM2 q/k/v, WikiText-2 ({ppl[0]['windows']}x2048)", fontsize=9)
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=6, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ main
def _git(*args: str) -> str:
    """Output of a git command in this checkout ("" when git is unavailable), to date the code measured."""
    import subprocess

    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29], help="SmolLM2 blocks (layers part)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8],
                        help="stored values per layer as a fraction of dense")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--leaf", type=int, default=64, help="SmolLM2 leaf (stories260K uses --small-leaf)")
    parser.add_argument("--small-leaf", type=int, default=16)
    parser.add_argument("--kappa", type=float, default=0.3, help="hassle-free-exact rank ratio (OATS default)")
    parser.add_argument("--hfe-iterations", type=int, default=20)
    parser.add_argument("--ppl-windows", type=int, default=8, help="first N windows of 2048 of WikiText-2 test")
    parser.add_argument("--parts", nargs="+", default=["layers", "speed", "ppl"], choices=["layers", "speed", "ppl"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replot", action="store_true", help="redraw hss.png from the last hss.jsonl record")
    args = parser.parse_args(argv)
    if args.replot:
        last = json.loads((RESULTS / "hss.jsonl").read_text().splitlines()[-1])
        plot(last["layers"], last["ppl"], RESULTS / "hss.png")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hasslefree").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    big = HSSOptions(sparsity=args.sparsity, leaf=args.leaf)
    small = HSSOptions(sparsity=args.sparsity, leaf=args.small_leaf)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "commit": _git("rev-parse", "--short", "HEAD"), "dirty_src": bool(_git("status", "--porcelain", "src")),
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "args": vars(args),
              "note": "shared 2-core machine (another benchmark running): timings are indicative; "
                      "SmolLM2 weights are the dequantised Q4_1 GGUF"}
    layer, speed, ppl = [], [], []

    model, tokenizer = load_model("smollm2")
    need = {b: list(LLAMA[:4]) for b in args.blocks} if "layers" in args.parts else {}
    if "ppl" in args.parts:
        for b in range(len(model.model.layers)):
            need[b] = sorted(set(need.get(b, [])) | set(QKV))
    hessians = collect_hessians(model, tokenizer, "smollm2", need, args) if need else {}
    if "layers" in args.parts:
        problems = {(b, n): (model.model.layers[b].get_submodule(n).weight.detach().clone(), hessians[(b, n)])
                    for b in args.blocks for n in LLAMA[:4]}
        layer += layer_rows("SmolLM2", problems, args.budgets, big, args)
        s_model, s_tok = load_model("stories260K")
        s_need = {b: list(LLAMA) for b in range(len(s_model.model.layers))}
        stories_text = str(find_data_file("text", "tinystories.validation-head.txt"))
        s_hess = collect_hessians(s_model, s_tok, "stories260K", s_need, args, calib=stories_text)
        s_problems = {(b, n): (s_model.model.layers[b].get_submodule(n).weight.detach().clone(), s_hess[(b, n)])
                      for b in s_need for n in LLAMA}
        layer += layer_rows("stories260K", s_problems, args.budgets, small, args)
        print("\n## Layers (geometric mean over layers; equal stored values per layer)\n")
        print(layer_table(layer))
    if "speed" in args.parts:
        q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        k = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
        big_random = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) / 64
        speed = speed_rows({
            "SmolLM2 q_proj": (q, HSSOptions(sparsity=args.sparsity, leaf=args.leaf, budget=args.budgets[0])),
            "SmolLM2 k_proj": (k, HSSOptions(sparsity=args.sparsity, leaf=args.leaf, budget=args.budgets[0])),
            "random 4096 (paper: s 0.3, R 512, leaf 256)": (big_random,
                                                            HSSOptions(sparsity=0.3, outer_rank=512, leaf=256)),
        })
        print("\n## Forward time, HSSLinear (shss-rcm) vs dense nn.Linear (median; shared machine)\n")
        print(speed_table(speed))
    if "ppl" in args.parts:
        best_frob = min(FROBENIUS, key=lambda m: geomean([r["rel_frobenius"] for r in layer
                                                          if r["method"] == m and r["model"] == "SmolLM2"] or [1]))
        best_aware = min(DATA_AWARE, key=lambda m: geomean([r["rel_objective"] for r in layer
                                                            if r["method"] == m and r["model"] == "SmolLM2"] or [1]))
        ppl = ppl_rows(model, tokenizer, hessians, args.budgets, big, [best_frob, best_aware], args)
        print(f"\n## SmolLM2, q/k/v of all 30 blocks replaced; WikiText-2 test, first {ppl[0]['windows']} "
              "windows of 2048\n")
        print(ppl_table(ppl))
    record.update(layers=layer, speed=speed, ppl=ppl, seconds=round(time.perf_counter() - began, 1))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "hss.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if layer:
        plot(layer, ppl, RESULTS / "hss.png")
    log.info("total %.0f s", time.perf_counter() - began)


if __name__ == "__main__":
    main()
