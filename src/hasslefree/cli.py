"""``hasslefree`` command line: compress, match, eval, info, export, generate.

Every argument, and every targeted layer of the model, is checked before the first block
is compressed; bad input ends with one ``hasslefree: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from hasslefree.cli_match import add_match_parser
from hasslefree.cli_args import (HSS_FLAGS, UsageError, device_from_arg, dtype_from_arg, hss_from_args, one_line,
                                  parse_overrides, quiet_transformers, rank_from_args, recipe_from_args)

logger = logging.getLogger("hasslefree.cli")

__all__ = ["HSS_FLAGS", "UsageError", "build_parser", "hss_from_args", "main", "parse_overrides", "rank_from_args"]

DTYPES = ("float32", "bfloat16", "float16")
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if args.quiet:
        quiet_transformers()
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"hasslefree: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("hasslefree: interrupted\n")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasslefree", description="Sparse + low-rank compression of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true", help="only warnings and results; no progress bars")

    c = sub.add_parser("compress", parents=[quiet], help="compress a model into a checkpoint directory")
    c.add_argument("model", help="HF folder, hub id, .gguf, llama2.c .bin, or alias (smollm2, stories260K)")
    c.add_argument("--out", required=True, help="output directory (also holds the resume state)")
    c.add_argument("--recipe", metavar="FILE", help="take every setting from a recipe JSON (or a run's report.json); then give "
                                                    "only --out, --dtype, --device, --calib and run flags")
    c.add_argument("--pattern", default="2:4", help="N:M (keep N of M), unstructured:D, row:D or dense")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--rank", type=int, help="fixed rank per layer (default 64; 0 for pruning methods)")
    budget.add_argument("--rho", type=float, help="compression ratio: rank from the budget left by the N:M part")
    c.add_argument("--kappa", type=float, help="rank ratio for unstructured sparsity (needs --rho)")
    c.add_argument("--method", default="hassle-free",
                   help="a preset (see hasslefree.PRESETS) or an HSS method: shss, shss-rcm, shss-whitened, "
                        "shss-rcm-whitened (these target only q/k/v unless overrides say otherwise)")
    c.add_argument("--iterations", type=int, help="alternating iterations (default: the method's)")
    c.add_argument("--calib", default="c4", help="calibration dataset name or text/jsonl/parquet file")
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, help="calibration window (default 2048, capped at the context)")
    c.add_argument("--batch-size", type=int, default=1, help="calibration windows per block call")
    c.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    c.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model dtype: the calibration forward passes run in it (bfloat16 is several "
                        "times faster on CPUs with AMX); the decomposition always runs in float32")
    c.add_argument("--activation-dtype", choices=DTYPES,
                   help="dtype of the stored block inputs between blocks (default: --dtype)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--percdamp", type=float, help="Hessian damping as a fraction of mean(diag H)")
    c.add_argument("--coordinate-damp", type=float,
                   help="extra damping as a fraction of each H_jj (the official code's runs: "
                        "--percdamp 0.005 --coordinate-damp 0.005)")
    c.add_argument("--layer-target", choices=("layer", "model"), default="layer",
                   help="fit each layer to the dense layer on the compressed chain's inputs (layer) or to the "
                        "dense model's own layer outputs, correcting the error carried in (model)")
    c.add_argument("--tolerance", type=float,
                   help="stop a layer's iterations once its objective improves by less than this "
                        "fraction over 5 iterations (default: the method's; 0 runs them all)")
    c.add_argument("--override", action="append", default=[], metavar="REGEX=key:value,...",
                   help="per-layer settings, e.g. 'mlp.down_proj=rank:32,pattern:4:8' (keys: pattern, rank, "
                        "method, iterations, skip)")
    c.add_argument("--skip", action="append", default=[], metavar="REGEX", help="leave matching layers dense")
    m = c.add_argument_group("block-output matching", "after each block is decomposed, tune its kept sparse "
                             "values and U, V so the block's outputs match the dense ones (Adam, cosine schedule)")
    m.add_argument("--match-epochs", type=int, default=0, help="passes over the calibration data (default 0: off)")
    m.add_argument("--match-lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    m.add_argument("--match-target", choices=("block", "model"), default="block",
                   help="block: the dense block on the same inputs; model: the dense model's own block outputs")
    m.add_argument("--match-tune-all", action="store_true",
                   help="also tune the block's other parameters (norm weights, layers left dense)")
    h = c.add_argument_group("HSS methods", "sparse S plus a hierarchical low-rank matrix (hasslefree.hss)")
    h.add_argument("--sparsity", type=float, help="fraction of the weights kept in S (default 0.3)")
    hss_size = h.add_mutually_exclusive_group()
    hss_size.add_argument("--outer-rank", type=int, help="rank of the root off-diagonal blocks (default 512)")
    hss_size.add_argument("--hss-budget", type=float, metavar="FRACTION",
                          help="stored values per layer as a fraction of the dense layer's; picks the outer rank")
    h.add_argument("--leaf", type=int, help="largest dense diagonal block (default 256)")
    h.add_argument("--min-rank", type=int, help="smallest off-diagonal rank (default 16)")
    h.add_argument("--rank-decay", type=float, help="rank factor per tree level (default 0.5)")
    h.add_argument("--sweeps", type=int, help="block coordinate-descent sweeps of the data-aware fit (default 1)")
    c.add_argument("--no-modules", action="store_true",
                   help="write the merged dense weights instead of SparseLowRankLinear modules")
    c.add_argument("--stream", action="store_true",
                   help="read the decoder blocks from the model's safetensors one at a time instead of "
                        "loading the whole model (local Hugging Face folders; memory stays one block deep)")
    c.add_argument("--no-true-sequential", action="store_true",
                   help="take all Hessians of a block from its input before compressing any of its layers")
    c.add_argument("--distributed", action="store_true",
                   help="run as one rank of a torchrun job (automatic when torchrun starts several): the "
                        "calibration is shared out, the layers solved across ranks, rank 0 writes --out")
    c.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long a rank waits for the others at a collective before the job fails")
    c.set_defaults(handler=_compress)
    add_match_parser(sub, [quiet], DTYPES)

    e = sub.add_parser("eval", parents=[quiet], help="perplexity of a model or compressed directory")
    e.add_argument("model", help="a compressed directory or anything `compress` accepts")
    e.add_argument("--ppl", default="wikitext2", help="comma-separated datasets or files")
    e.add_argument("--seqlen", type=int, help="window length (default 2048, capped at the context)")
    e.add_argument("--max-windows", type=int, help="score only the first N windows of each dataset")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--tokenizer", help="model whose tokenizer to use (default: the one saved or loaded)")
    e.add_argument("--tasks", help="comma-separated lm-eval tasks, 0-shot (hasslefree[zeroshot]); --ppl '' skips ppl")
    e.add_argument("--tasks-path", help="folder (or YAML file) of extra local lm-eval task definitions")
    e.add_argument("--tasks-data", metavar="DIR",
                   help="zero-shot data folder of the eight paper tasks (default: shared/data/zeroshot)")
    e.add_argument("--limit", type=int, help="score only the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=1, help="zero-shot batch size")
    e.add_argument("--json", metavar="PATH", help="also write the perplexities and accuracies to this JSON file")
    e.set_defaults(handler=_eval)

    i = sub.add_parser("info", parents=[quiet], help="sizes of a compressed checkpoint")
    i.add_argument("directory")
    i.set_defaults(handler=_info)

    x = sub.add_parser("export", parents=[quiet], help="export a compressed checkpoint for plain transformers/peft")
    x.add_argument("directory")
    x.add_argument("--to", choices=("dense", "peft"), required=True)
    x.add_argument("output")
    x.set_defaults(handler=_export)

    g = sub.add_parser("generate", parents=[quiet], help="generate text from a model or compressed directory")
    g.add_argument("model", help="a compressed directory or anything `compress` accepts")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    g.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="keep sparse + low-rank layers packed in memory (default; --no-packed: dense storage)")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default=None)
    g.add_argument("--tokenizer", help="model whose tokenizer to use (default: the one saved or loaded)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    g.add_argument("--seed", type=int, default=0, help="random seed (with --sample)")
    g.set_defaults(handler=_generate)
    return parser


def _compress(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from hasslefree.calibration import calibration_batch
    from hasslefree.data import resolve_source
    from hasslefree.loading.context import check_seqlen
    from hasslefree.pipeline import ResumeMismatch, check_calibration, compress, prepare
    from hasslefree.pipeline.api import check_options
    from hasslefree.pipeline.distributed import Ranks, end_process_group, launched_by_torchrun, start_process_group

    defaults = vars(build_parser().parse_args(["compress", args.model, "--out", args.out]))
    try:
        recipe = recipe_from_args(args, defaults)
        engine = recipe.engine.given()
        check_options(pattern=recipe.pattern, rank=recipe.rank_policy(), method=recipe.method,
                      iterations=recipe.iterations, overrides=recipe.overrides, skip=recipe.skip, engine_options=engine,
                      hss=recipe.hss)
        device = device_from_arg(args.device)
        resolve_source(recipe.calib, split="calib")
        if args.distributed or launched_by_torchrun():
            device = start_process_group(torch.device(device), args.dist_timeout)
        model, tokenizer, block_weights = _load_for_compress(args)
        prepare(model, pattern=recipe.pattern, rank=recipe.rank_policy(), method=recipe.method,
                iterations=recipe.iterations, overrides=recipe.overrides, skip=recipe.skip, engine_options=engine,
                hss=recipe.hss)
        # without --seqlen (or a recipe) the window is 2048 capped at the model's context
        recipe = dataclasses.replace(recipe, seqlen=check_seqlen(model, recipe.seqlen if args.recipe or args.seqlen
                                                                 else None))
        calibration = check_calibration(model, calibration_batch(tokenizer, recipe.calib, recipe.nsamples,
                                                                 recipe.seqlen, recipe.seed))
    except (ValueError, OSError) as exc:
        raise UsageError(one_line(exc)) from None
    writer = Ranks.current().writes
    if not writer:  # one voice: the other ranks log only warnings and errors
        logging.getLogger("hasslefree").setLevel(logging.WARNING)
    try:
        with _logging_beside_bars(not args.quiet and writer):
            report = compress(model, tokenizer, recipe, calibration=calibration, device=device, out_dir=args.out,
                              progress=not args.quiet, model_name=args.model, block_weights=block_weights)
    except ResumeMismatch as exc:
        raise UsageError(one_line(exc)) from None
    finally:
        end_process_group()
    if writer:
        sys.stdout.write(f"{report.summary()}\nwrote {args.out}\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hasslefree.evaluate import check_eval_inputs, eval_tables
    from hasslefree.loading.context import check_seqlen

    try:
        datasets, tasks = check_eval_inputs(args.ppl, args.tasks, max_windows=args.max_windows,
                                            tasks_path=args.tasks_path, limit=args.limit, batch_size=args.batch_size,
                                            tasks_data=args.tasks_data, json_path=args.json)
        device = device_from_arg(args.device)
        model, tokenizer = _load(args.model, args.dtype, device=device, tokenizer=args.tokenizer)
        seqlen = check_seqlen(model, args.seqlen) if datasets else None
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(one_line(exc)) from None
    tables = eval_tables(model, tokenizer, datasets, seqlen, tasks, max_windows=args.max_windows,
                         tasks_path=args.tasks_path, limit=args.limit, batch_size=args.batch_size,
                         tasks_data=args.tasks_data, json_path=args.json, model_name=args.model)
    sys.stdout.write(f"{args.model}\n{tables}\n" + (f"wrote {args.json}\n" if args.json else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    from hasslefree.checkpoint import info_command

    return info_command(args.directory)


def _export(args: argparse.Namespace) -> int:
    from hasslefree.checkpoint import CheckpointError, export_dense, export_peft

    try:
        target = (export_dense if args.to == "dense" else export_peft)(args.directory, args.output)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UsageError(one_line(exc)) from None
    sys.stdout.write(f"wrote {target}\n")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hasslefree.generate import check_generate_options, generate_text

    try:
        check_generate_options(args.prompt, args.max_new_tokens, args.sample, args.temperature)
        device = device_from_arg(args.device)
        model, tokenizer = _load(args.model, args.dtype, device=device, tokenizer=args.tokenizer)
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, packed=args.packed,
                             sample=args.sample, temperature=args.temperature, seed=args.seed)
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(one_line(exc)) from None
    sys.stdout.write(text + "\n")
    return 0


def _logging_beside_bars(enabled: bool) -> Any:
    """Route log lines through tqdm while bars are drawn, so they do not tear the bars."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return contextlib.nullcontext()
    return logging_redirect_tqdm()


def _load(spec: str, dtype: str, device: str = "cpu", tokenizer: str | None = None) -> tuple[Any, Any]:
    from hasslefree.evaluate import load_any

    return load_any(spec, dtype=dtype_from_arg(dtype), device=device, tokenizer=tokenizer)


def _load_for_compress(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, block weights or None)``; with --stream the blocks stay on disk."""
    if not args.stream:
        return (*_load(args.model, args.dtype), None)
    from hasslefree.loading import open_streaming
    from hasslefree.loading.hf import load_tokenizer

    model, weights = open_streaming(args.model, dtype=dtype_from_arg(args.dtype))
    return model, load_tokenizer(args.model), weights


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
