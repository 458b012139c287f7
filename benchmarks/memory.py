"""Peak memory of a streamed compression against model depth (Llama-3-8B-shaped blocks).

Builds random-weight models of the 8B shape (hidden 4096, MLP 14336, 32 heads / 8 KV heads,
vocab 128256) with 2 and 4 decoder blocks, saves them as safetensors, then compresses each
in a fresh process with the blocks streamed from disk (``open_streaming``), and reports the
peak resident memory of that process. Memory must not grow with depth: the run holds the
non-block weights, one block, the activations of the calibration set and one layer group's
Hessian work.

    python benchmarks/memory.py --blocks 2 4 --nsamples 4 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from random_weights import fill_random_
from results_log import append_record

logger = logging.getLogger("memory")
ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def build_model(folder: Path, blocks: int, dtype: torch.dtype) -> None:
    """A random 8B-shaped Llama with ``blocks`` decoder blocks, saved as safetensors."""
    if (folder / "config.json").is_file():
        return
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=blocks, **SHAPE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(blocks)
    for module in model.modules():  # fill directly in the target dtype: no float32 copy of the model
        fill_random_(module, dtype, generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.save_pretrained(str(folder))
    logger.info("built %s", folder)


def child(args: argparse.Namespace) -> None:
    """One streamed compression in this process; print its report as JSON."""
    from hasslefree.loading import open_streaming
    from hasslefree.pipeline import compress

    dtype = getattr(torch, args.dtype)
    began = time.perf_counter()
    model, weights = open_streaming(args.model, dtype=dtype)
    opened = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=generator)
    report = compress(model, calibration=ids, pattern="2:4", rank=args.rank, method=args.method,
                      iterations=args.iterations, start="sparse", out_dir=args.out, block_weights=weights,
                      activation_dtype=dtype, progress=False)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_open_mb": opened, "timings": report.timings,
                      "wall_s": time.perf_counter() - began}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--method", default="hassle-free-fast")
    parser.add_argument("--iterations", type=int, default=1, help="peak memory does not depend on it")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.child:
        child(args)
        return
    rows = []
    for blocks in args.blocks:
        folder = args.workdir / f"llama8b_shape_{blocks}blocks_{args.dtype}"
        build_model(folder, blocks, getattr(torch, args.dtype))
        out = args.workdir / f"out_{blocks}blocks"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [sys.executable, __file__, "--child", "--model", str(folder), "--out", str(out),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--method", args.method,
                   "--iterations", str(args.iterations), "--dtype", args.dtype, "--rank", str(args.rank)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        rows.append({"blocks": blocks, "model_mb": round(disk), **result})
        logger.info("%d blocks: peak RSS %.0f MB (model file %.0f MB)", blocks, result["peak_rss_mb"], disk)
    print("| blocks | model on disk (MB) | RSS after opening (MB) | peak RSS (MB) | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['model_mb']:,} | {r['rss_after_open_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['wall_s']:.0f} |")
    if len(rows) > 1:
        growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
        print(f"\npeak RSS growth {rows[0]['blocks']} -> {rows[-1]['blocks']} blocks: {100 * growth:+.1f} %")
    append_record("memory", {"shape": SHAPE, "nsamples": args.nsamples, "seqlen": args.seqlen,
                             "method": args.method, "iterations": args.iterations, "dtype": args.dtype,
                             "rows": rows})


if __name__ == "__main__":
    main()
