"""Decode and prefill speed and resident memory of a compressed model, dense vs compressed.

Variants, each measured in a fresh subprocess (so memory and speed do not leak between them):

* ``dense``         the dense model (``--dtype``, bfloat16 by default);
* ``slr``           compressed, W_S in dense storage (:class:`SparseLowRankLinear`);
* ``packed-torch``  compressed, W_S packed (:class:`PackedSparseLowRankLinear`), pure-torch
  forward (``HASSLEFREE_NO_KERNELS=1``);
* ``packed-numba``  compressed, packed, with the numba CPU decode kernel.

Per variant: prefill tokens/s (one forward of a ``--prompt-tokens`` prompt, batch 1, KV cache
on), decode tokens/s (``--new-tokens`` greedy steps of one token from that cache), and
resident memory = process RSS after loading (and reading every tensor once, so memory-mapped
weights count) minus RSS after importing torch, transformers and
hasslefree (with the model's code loaded through a meta-device skeleton, which holds no
weights), and RSS after the run on the same baseline (it includes numba/LLVM and the KV cache). A short
warm-up (8-token prompt, 2 decode steps; it compiles or loads the numba kernels) precedes the
measurements. Ratios are against the dense variant of the same run.

Inputs: a compressed checkpoint (``--compressed DIR --model DENSE_SOURCE``), or
``--synthetic``: a Llama-shaped stack (default hidden 4096, MLP 14336, 32/8 heads, as
Llama-3-8B, with ``--blocks`` decoder blocks and a ``--vocab`` of 32000) with RANDOM weights;
the compressed variants prune every block linear layer to ``--pattern`` by magnitude and add
random rank-``--rank`` U, V. Random weights say nothing about quality, only about cost.

    python benchmarks/inference.py --synthetic --blocks 4 --threads 2
    python benchmarks/inference.py --compressed out/smollm2-2of4 --model HuggingFaceTB/SmolLM2-135M-Instruct

Prints a markdown table and appends a record to benchmarks/results/inference.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "dense": "dense",
    "slr": "compressed, dense storage (SparseLowRankLinear)",
    "packed-torch": "compressed, packed (torch path)",
    "packed-numba": "compressed, packed (numba kernel)",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------------- child: one variant
def model_config(args: argparse.Namespace):
    """The transformers config of the model under test."""
    from transformers import AutoConfig, LlamaConfig

    if args.compressed is not None:
        from hasslefree.checkpoint.format import read_checkpoint_config

        hf = dict(read_checkpoint_config(args.compressed)["hf_config"])
        return AutoConfig.for_model(hf.pop("model_type"), **hf)
    heads = args.heads or max(1, args.hidden // 128)
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.blocks,
                       num_attention_heads=heads, num_key_value_heads=args.kv_heads or max(1, heads // 4),
                       vocab_size=args.vocab, max_position_embeddings=max(4096, 2 * args.prompt_tokens),
                       rope_theta=500000.0, tie_word_embeddings=False)


def meta_skeleton(config, dtype):
    """The model on the meta device: no memory for weights, but every module's code imported."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def synthetic_model(args: argparse.Namespace, variant: str):
    """The random Llama-shaped model of ``variant``, built layer by layer in the target dtype."""
    import torch

    from hasslefree.nn import PackedSparseLowRankLinear, SparseLowRankLinear, replace_linear
    from random_weights import fill_random_
    from hasslefree.patterns import SparsityPattern

    dtype = getattr(torch, args.dtype)
    config = model_config(args)
    model = meta_skeleton(config, dtype)
    pattern = SparsityPattern.parse(args.pattern)
    for index, (name, module) in enumerate(list(model.named_modules())):
        g = torch.Generator().manual_seed(args.seed * 100003 + index)  # same weights in every variant
        if variant != "dense" and name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            w = torch.empty(module.out_features, module.in_features, dtype=dtype).normal_(0.0, 0.02, generator=g)
            w = pattern.project(w)
            U = torch.empty(module.out_features, args.rank, dtype=dtype).normal_(0.0, 0.02, generator=g)
            V = torch.empty(module.in_features, args.rank, dtype=dtype).normal_(0.0, 0.02, generator=g)
            layer = SparseLowRankLinear.from_linear_parts(w, U, V, pattern=args.pattern)
            del w
            if variant != "slr":
                layer = PackedSparseLowRankLinear.from_module(layer, name=name)
            for p in layer.parameters():
                p.requires_grad_(False)
            replace_linear(model, name, layer)
            continue
        fill_random_(module, dtype, g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def checkpoint_model(args: argparse.Namespace, variant: str):
    import torch

    dtype = getattr(torch, args.dtype)
    if variant == "dense":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.dense_dir or args.model, dtype=dtype)
    from hasslefree.checkpoint import load_compressed

    return load_compressed(args.compressed, packed=variant != "slr").to(dtype)


def block_linear_bytes(model) -> int:
    """Bytes of every linear layer's tensors (weights, packed values and positions, U, V, bias),
    the LM head left out: the part that compression changes."""
    import torch

    from hasslefree.nn import PackedSparseLowRankLinear, SparseLowRankLinear

    kinds = (torch.nn.Linear, SparseLowRankLinear, PackedSparseLowRankLinear)
    return sum(t.numel() * t.element_size()
               for name, m in model.named_modules() if isinstance(m, kinds) and not name.endswith("lm_head")
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))


def read_bandwidth_gbs(threads: int) -> float:
    """Memory read bandwidth in GB/s: the best of five sums over a 1 GiB float32 tensor (far
    larger than any cache), on ``threads`` threads: the roofline for memory-bound decode."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    data = torch.ones(2**28, dtype=torch.float32)
    data.sum()
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - began)
    return data.numel() * 4 / best / 1e9


def child(args: argparse.Namespace) -> None:
    import gc
    import inspect

    import torch
    import transformers  # noqa: F401  (part of the baseline)

    from hasslefree.cpu_bf16 import bf16_products_in_float32_for_prompts, native_bf16
    from hasslefree.nn import PackedSparseLowRankLinear, decode_kernels  # part of the baseline too

    if args.threads:
        torch.set_num_threads(args.threads)
    # Baseline: the libraries imported, the model's code loaded (a meta-device skeleton, no
    # weights) and torch's kernels initialised, so the difference is the model's own memory.
    meta_skeleton(model_config(args), getattr(torch, args.dtype))
    import hasslefree.checkpoint  # noqa: F401

    torch.ones(4, 4, dtype=getattr(torch, args.dtype)) @ torch.ones(4, 4, dtype=getattr(torch, args.dtype))
    if args.variant == "packed-numba":  # the runtime, like torch: numba and llvmlite's libraries
        decode_kernels()
    gc.collect()
    base = rss_mb()
    began = time.perf_counter()
    model = (synthetic_model if args.synthetic else checkpoint_model)(args, args.variant).eval()
    with torch.no_grad():  # read every tensor once: memory-mapped weights count only once paged in
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    gc.collect()
    loaded = rss_mb()
    load_s = time.perf_counter() - began
    packed = sum(isinstance(m, PackedSparseLowRankLinear) for m in model.modules())
    linear_mb = block_linear_bytes(model) / 2**20
    head = model.get_output_embeddings()
    head_mb = head.weight.numel() * head.weight.element_size() / 2**20 if head is not None else 0.0
    kernels = decode_kernels() if args.variant.startswith("packed") else None  # numba only where it is used
    if args.variant == "packed-numba" and kernels is None:
        raise SystemExit("packed-numba: the numba kernels are not available (pip install numba)")
    if args.variant == "packed-torch" and kernels is not None:
        raise SystemExit("packed-torch: the kernels should be disabled (HASSLEFREE_NO_KERNELS)")
    if args.variant.startswith("packed") and packed == 0:
        raise SystemExit(f"{args.variant}: the model has no packed layers")

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def step(tokens, past):
        out = model(input_ids=tokens, past_key_values=past, use_cache=True, **keep)
        return out.logits[:, -1].argmax(dim=-1, keepdim=True), out.past_key_values

    with torch.no_grad(), bf16_products_in_float32_for_prompts(model):  # as `hasslefree generate` runs
        tok, past = step(ids[:, :8], None)  # warm-up: kernels compiled or loaded from numba's cache
        for _ in range(2):
            tok, past = step(tok, past)
        del past
        t0 = time.perf_counter()
        tok, past = step(ids, None)
        prefill_s = time.perf_counter() - t0
        generated = [int(tok)]
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            tok, past = step(tok, past)
            generated.append(int(tok))
        decode_s = time.perf_counter() - t0
    print(json.dumps({
        "variant": args.variant, "load_s": load_s, "rss_base_mb": base, "rss_loaded_mb": loaded,
        "resident_mb": loaded - base, "rss_after_run_mb": rss_mb() - base, "packed_layers": packed,
        "linear_mb": linear_mb, "decode_read_mb": linear_mb + head_mb,
        "prefill_s": prefill_s, "prefill_tok_s": args.prompt_tokens / prefill_s,
        "decode_s": decode_s, "decode_tok_s": args.new_tokens / decode_s, "tokens": generated,
        "torch_threads": torch.get_num_threads(), "kernels": kernels is not None,
        "bf16_products_in_float32": not native_bf16(),
    }))


# ----------------------------------------------------------------- parent
def dense_directory(model: str, dtype: str, folder: Path) -> Path:
    """A Hugging Face folder of the dense model, so the dense variant loads the way a user's
    model loads (``from_pretrained`` of safetensors): ``model`` itself when it is such a folder,
    else the model as :func:`hasslefree.loading.load_model` gives it (aliases, GGUF, llama2.c)
    saved into ``folder`` in ``dtype``. Nothing of the conversion stays in the measured process."""
    if (Path(model) / "config.json").is_file():
        return Path(model)
    import torch

    from hasslefree.loading import load_model

    dense, tokenizer = load_model(model, dtype=getattr(torch, dtype))
    dense.save_pretrained(folder)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    return folder


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    env = dict(os.environ)
    if args.threads:
        env.update({name: str(args.threads) for name in THREAD_VARS})
    if variant == "packed-torch":
        env["HASSLEFREE_NO_KERNELS"] = "1"
    else:
        env.pop("HASSLEFREE_NO_KERNELS", None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    command = [sys.executable, __file__, *args.argv, "--child", "--variant", variant]
    if variant == "dense" and args.dense_dir:
        command += ["--dense-dir", str(args.dense_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"variant {variant} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(tokens: list[int], reference: list[int]) -> str:
    """"all N", or how many leading tokens agree: bf16 outputs that differ only in summation
    order can flip a near-tie argmax, after which greedy sequences part (common on random weights)."""
    if tokens == reference:
        return f"all {len(tokens)}"
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return f"first {first} of {len(reference)}"


def table(rows: list[dict], dtype: str) -> str:
    dense = next((r for r in rows if r["variant"] == "dense"), None)

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / dense[key]:.2f}×" if dense and dense[key] else "–"

    lines = ["| variant | decode tok/s | × dense | decode GB/s read | prefill tok/s | × dense | linear layers MB | "
             "× dense | resident MB | × dense | RSS after run MB | greedy tokens as dense storage |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    slr = next((r for r in rows if r["variant"] == "slr"), None)
    for r in rows:
        label = f"dense {dtype}" if r["variant"] == "dense" else VARIANTS[r["variant"]]
        same = "–" if slr is None or r["variant"] in ("dense", "slr") else _agreement(r["tokens"], slr["tokens"])
        reads = r["decode_read_mb"] * 2**20 * r["decode_tok_s"] / 1e9  # weight bytes per token x tokens/s
        lines.append(f"| {label} | {r['decode_tok_s']:.2f} | {ratio(r, 'decode_tok_s')} | {reads:.1f} | "
                     f"{r['prefill_tok_s']:.1f} | "
                     f"{ratio(r, 'prefill_tok_s')} | {r['linear_mb']:,.0f} | {ratio(r, 'linear_mb')} | "
                     f"{r['resident_mb']:,.0f} | {ratio(r, 'resident_mb')} | "
                     f"{r['rss_after_run_mb']:,.0f} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--compressed", type=Path, help="compressed checkpoint directory")
    source.add_argument("--synthetic", action="store_true", help="random Llama-shaped weights (see --hidden ...)")
    parser.add_argument("--model", help="dense source of --compressed (path or hub id), for the dense variant")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 128)")
    parser.add_argument("--kv-heads", type=int, default=0, help="KV heads (default heads / 4)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pattern", default="2:4", help="synthetic: N:M pattern of the magnitude pruning")
    parser.add_argument("--rank", type=int, default=64, help="synthetic: rank of the random U, V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch and numba threads (default: inherit)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--dense-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.compressed is not None and "dense" in args.variants and not args.model:
        parser.error("--compressed needs --model (its dense source) for the dense variant, or leave 'dense' "
                     "out of --variants")
    if args.prompt_tokens < 8 or args.new_tokens < 1:
        parser.error("--prompt-tokens must be >= 8 and --new-tokens >= 1")
    args.argv = argv
    rows = []
    with tempfile.TemporaryDirectory(prefix="dense-") as folder:
        if args.compressed is not None and "dense" in args.variants:
            args.dense_dir = dense_directory(args.model, args.dtype, Path(folder))
        for variant in args.variants:
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            rows.append(run_variant(args, variant))
    if args.synthetic:
        source = (f"SYNTHETIC RANDOM WEIGHTS (no real model): Llama-shaped, hidden {args.hidden}, MLP "
                  f"{args.intermediate}, {args.blocks} blocks, vocab {args.vocab}; compressed = magnitude "
                  f"{args.pattern} of the random weights + random rank-{args.rank} U, V")
    else:
        source = f"checkpoint {args.compressed} (dense: {args.model})"
    threads = rows[0]["torch_threads"]
    bandwidth = read_bandwidth_gbs(args.threads)
    print(f"\n{source}\n{args.dtype}, batch 1, prefill {args.prompt_tokens} tokens, decode {args.new_tokens} "
          f"greedy tokens with KV cache, {threads} thread(s); memory read bandwidth {bandwidth:.1f} GB/s "
          f"(decode GB/s read = weight bytes per token x tokens/s: the share of it each variant reaches)\n")
    print(table(rows, args.dtype))
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch
        from results_log import append_record

        if args.threads:
            torch.set_num_threads(args.threads)  # the record's "threads" field

        try:
            import numba

            numba_version = numba.__version__
        except ImportError:
            numba_version = None
        shape = {"hidden": args.hidden, "intermediate": args.intermediate, "blocks": args.blocks,
                 "vocab": args.vocab, "pattern": args.pattern, "rank": args.rank} if args.synthetic else None
        path = append_record("inference", {
            "source": "synthetic" if args.synthetic else str(args.compressed), "random_weights": args.synthetic,
            "dense_model": args.model, "shape": shape, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "bench_threads": threads, "numba": numba_version,
            "read_bandwidth_gbs": bandwidth,
            "rows": rows})
        print(f"\nappended to {path}")


if __name__ == "__main__":
    main()
