"""The methods table's text: the header that states the run's settings, and the markdown rows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DATASETS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
SETTINGS = {"a": "(a) 2:4 + rank {rank}", "b": "(b) 2:8, rho = {rho}"}
MATCH = "+match"  # a method name ending in this runs with block-output matching
TO_MODEL = "+to-model"  # ... and with this before it (or alone): layer_target="model"
MODEL_NOTES = {"smollm2": "SmolLM2-135M-Instruct; weights 4-bit (Q4_1 GGUF) quantised, dequantised to fp32",
               "stories260k": "stories260K (llama2.c, exact fp32)"}


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    names = [DATASETS.get(d, Path(d).name) for d in args.datasets]
    lines = ["| setting | method | pattern | rank | params (linear) | / dense | " + " | ".join(names)
             + " | compress s | eval s |", "|---|---|---|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        rank = "—" if r["ranks"] is None else (f"{r['rank']} (r {r['ranks'][0]}–{r['ranks'][1]})"
                                               if isinstance(r["rank"], str) else str(r["rank"]))
        setting = "—" if r["method"] == "dense" else SETTINGS[r["setting"]].format(rank=args.rank, rho=args.rho)
        ppl = " | ".join(f"{r['ppl'][d]:.2f}" for d in args.datasets)
        lines.append(f"| {setting} | {r['method']} | {r['pattern']} | {rank} | {r['parameters']:,} | "
                     f"{r['parameters'] / r['dense_parameters']:.3f} | {ppl} | {r['compress_s']:.1f} | "
                     f"{r['eval_s']:.1f} |")
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    note = MODEL_NOTES.get(args.model.lower(), args.model)
    windows = "all windows (C4: 256)" if args.eval_windows is None else f"first {args.eval_windows} windows"
    return (f"## {args.model}: {note}\n\nCalibration: {args.nsamples} x {args.seqlen} tokens from C4 (documents "
            f"1100-1999, seed {args.seed}), model in {args.dtype} while compressing; "
            + (f"{args.iterations} alternating iterations" if args.iterations else "each preset's own iterations")
            + " for the sparse + low-rank methods"
            + (f"; +match: block-output matching, {args.match_epochs} epoch(s), lr {args.match_lr:g}, target "
               f"{args.match_target}" if any(m.endswith(MATCH) for m in args.methods) else "")
            + ("; +to-model: every layer fitted to the dense model's outputs of that layer (layer_target "
               "model)" if any(TO_MODEL in m for m in args.methods) else "")
            + (f"; every compressed row with --override {' '.join(args.override)}" if args.override else "")
            + f". Perplexity in {args.eval_dtype}, windows of {args.eval_seqlen} tokens, {windows}. Pruning-only rows "
            f"store only "
            f"the kept weights (rank 0); params = stored values of the compressed linear layers"
            + (f" (left dense and not counted: {', '.join(args.skip)})" if args.skip else "") + ".\n")




def zero_shot_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """0-shot accuracy (%) per task and the plain average; "—" where a row has no number yet."""
    lines = ["| setting | method | pattern | rank | " + " | ".join(args.tasks) + " | average |",
             "|---|---|---|---|" + "---|" * (len(args.tasks) + 1)]
    for r in rows:
        accuracy = (r.get("zeroshot") or {}).get("accuracy", {})
        cells = [f"{100 * accuracy[t]:.2f}" if t in accuracy else "—" for t in args.tasks]
        average = (f"{100 * sum(accuracy[t] for t in args.tasks) / len(args.tasks):.2f}"
                   if all(t in accuracy for t in args.tasks) else "—")
        setting = "—" if r["method"] == "dense" else SETTINGS[r["setting"]].format(rank=args.rank, rho=args.rho)
        lines.append(f"| {setting} | {r['method']} | {r['pattern']} | {r['rank'] if r['rank'] is not None else '—'} | "
                     + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)
