"""``hasslefree match``: block-output matching on a checkpoint that is already compressed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hasslefree.cli_args import UsageError, device_from_arg, dtype_from_arg, one_line

REPORT_NAME = "match_report.json"


def add_match_parser(sub: Any, parents: list[argparse.ArgumentParser], dtypes: tuple[str, ...]) -> None:
    p = sub.add_parser("match", parents=parents,
                       help="tune a compressed checkpoint's blocks so their outputs match the dense model's")
    p.add_argument("directory", help="a compressed checkpoint directory (left unchanged)")
    p.add_argument("--out", required=True, help="output directory for the tuned checkpoint (also the resume state)")
    p.add_argument("--dense", help="the model the checkpoint was compressed from (default: the checkpoint's source "
                                   "when it is a built-in alias such as smollm2)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the calibration data (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--target", choices=("block", "model"), default="model",
                   help="model (default): the dense model's own block outputs; block: the dense block on the "
                        "same inputs")
    p.add_argument("--tune-all", action="store_true",
                   help="also tune the block's other parameters (norm weights, layers left dense)")
    p.add_argument("--accumulate", type=int, default=1, help="calibration batches per optimiser step (default 1)")
    p.add_argument("--calib", default="c4", help="calibration dataset name or text/jsonl/parquet file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, help="calibration window (default 2048, capped at the context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per block call")
    p.add_argument("--dtype", choices=dtypes, default="float32",
                   help="dtype of the forward passes (trained values stay float32); the output is saved in it")
    p.add_argument("--device", default=None)
    p.set_defaults(handler=match_command)


def match_command(args: argparse.Namespace) -> int:
    from hasslefree.checkpoint import CheckpointError, load_compressed, save_compressed
    from hasslefree.checkpoint.files import read_checkpoint_config
    from hasslefree.calibration import calibration_batch
    from hasslefree.data import resolve_source
    from hasslefree.evaluate import is_compressed_dir, load_any
    from hasslefree.loading import builtin_alias
    from hasslefree.loading.context import check_seqlen
    from hasslefree.pipeline import MatchOptions, ResumeMismatch, check_calibration
    from hasslefree.pipeline.match_existing import check_pair, match_compressed

    source, out = Path(args.directory), Path(args.out)
    try:
        if not is_compressed_dir(source):
            raise ValueError(f"{source} is not a compressed checkpoint directory")
        if out.resolve() == source.resolve():
            raise ValueError("--out must differ from the checkpoint directory, which is left unchanged")
        options = MatchOptions(epochs=args.epochs, lr=args.lr, target=args.target, accumulate=args.accumulate,
                               tune_all=args.tune_all)
        if not options.enabled:
            raise ValueError("--epochs must be at least 1")
        if args.batch_size < 1 or args.nsamples < 1:
            raise ValueError("--batch-size and --nsamples must be at least 1")
        run_config = dict(read_checkpoint_config(source).get("run_config") or {})
        dense_spec = args.dense or builtin_alias(run_config.get("model"))
        if dense_spec is None:
            raise ValueError("name the model the checkpoint was compressed from with --dense")
        resolve_source(args.calib, split="calib")
        device = device_from_arg(args.device)
        dtype = dtype_from_arg(args.dtype)
        model = load_compressed(source, packed=False).to(dtype)
        dense, tokenizer = load_any(dense_spec, dtype=dtype)
        check_pair(model, dense)
        calibration = check_calibration(model, calibration_batch(tokenizer, args.calib, args.nsamples,
                                                                 check_seqlen(model, args.seqlen), args.seed))
    except (ValueError, OSError, CheckpointError) as exc:
        raise UsageError(one_line(exc)) from None
    try:
        run = match_compressed(model, dense, calibration, options=options, device=device, batch_size=args.batch_size,
                               out_dir=out, progress=not args.quiet)
    except ResumeMismatch as exc:
        raise UsageError(one_line(exc)) from None
    run_config["match"] = options.to_dict()
    run_config["match_calibration"] = {"calib": args.calib, "nsamples": args.nsamples,
                                       "seqlen": int(calibration.shape[1]), "seed": args.seed}
    save_compressed(model, out, run_config=run_config, tokenizer=tokenizer)
    report = {"source_method": run_config.get("method"), "options": options.to_dict(),
              "calibration": run_config["match_calibration"], **run.to_dict()}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
    sys.stdout.write(f"{run.summary()}\nwrote {out}\n")
    return 0

