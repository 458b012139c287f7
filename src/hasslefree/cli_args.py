"""Turning ``hasslefree`` command-line arguments into typed values, with one-line errors."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """'REGEX=key:value,key:value' items into compress()'s overrides mapping."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        regex, sep, spec = item.rpartition("=")
        if not sep or not regex or not spec:
            raise UsageError(f"--override {item!r}: expected REGEX=key:value[,key:value...]")
        values: dict[str, Any] = {}
        for part in spec.split(","):
            key, _, value = part.partition(":")
            key = key.strip()
            if key == "skip":
                values["skip"] = value.strip().lower() not in {"0", "false", "no"}
            elif key in {"rank", "iterations"}:
                try:
                    values[key] = int(value)
                except ValueError:
                    raise UsageError(f"--override {item!r}: {key} must be an integer, got {value!r}") from None
            elif key in {"pattern", "method"} and value:
                values[key] = value.strip()
            else:
                raise UsageError(f"--override {item!r}: unknown or empty key {part!r}; "
                                 "use pattern, rank, method, iterations or skip")
        overrides.setdefault(regex, {}).update(values)
    return overrides


def rank_from_args(args: argparse.Namespace) -> Any:
    from hasslefree.rank_policy import RankPolicy

    if args.kappa is not None:
        if args.rho is None:
            raise UsageError("--kappa needs --rho (the overall compression ratio)")
        return RankPolicy.rank_ratio(args.kappa, args.rho)
    if args.rho is not None:
        return RankPolicy.compression(args.rho)
    return args.rank


# compress flags that are part of the recipe (everything that changes the result)
RECIPE_FLAGS = ("pattern", "rank", "rho", "kappa", "method", "iterations", "override", "skip", "seed", "percdamp",
                "coordinate_damp", "tolerance", "match_epochs", "match_lr", "match_target", "match_tune_all",
                "layer_target", "calib",
                "nsamples", "seqlen", "batch_size", "no_true_sequential", "no_modules", "activation_dtype", "sparsity",
                "outer_rank", "hss_budget", "leaf", "min_rank", "rank_decay", "sweeps")


def recipe_from_args(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """The run's :class:`~hasslefree.pipeline.recipe.Recipe`: read from ``--recipe FILE`` (then no
    recipe flag may differ from its default), else built from the flags."""
    from hasslefree.pipeline import DEFAULT_SKIP, MatchOptions
    from hasslefree.pipeline.recipe import Recipe

    if args.recipe:  # every setting from the file; only the calibration source may be named here
        changed = [flag for flag in RECIPE_FLAGS if flag != "calib" and getattr(args, flag) != defaults.get(flag)]
        if changed:
            raise UsageError(f"--recipe gives every setting; drop {', '.join('--' + f.replace('_', '-') for f in changed)}")
        return Recipe.from_json_file(args.recipe, calib=args.calib if args.calib != defaults.get("calib") else None)
    if args.match_epochs and args.no_modules:
        raise UsageError("--match-epochs tunes the compressed modules; it cannot run with --no-modules")
    engine = {key: value for key, value in (("percdamp", args.percdamp), ("tolerance", args.tolerance),
                                            ("coordinate_damp", args.coordinate_damp)) if value is not None}
    return Recipe.from_settings(dict(
        pattern=args.pattern, rank=rank_from_args(args), method=args.method, iterations=args.iterations,
        overrides=parse_overrides(args.override), skip=(*DEFAULT_SKIP, *args.skip), seed=args.seed,
        hss=hss_from_args(args), match=MatchOptions(epochs=args.match_epochs, lr=args.match_lr, target=args.match_target,
                                                  tune_all=args.match_tune_all),
        layer_target=args.layer_target,
        calib=args.calib, nsamples=args.nsamples, seqlen=2048 if args.seqlen is None else args.seqlen,
        batch_size=args.batch_size,
        true_sequential=not args.no_true_sequential, dense=args.no_modules,
        activation_dtype=args.activation_dtype or args.dtype, **engine))


HSS_FLAGS = {"sparsity": "sparsity", "outer_rank": "outer_rank", "hss_budget": "budget", "leaf": "leaf",
             "min_rank": "min_rank", "rank_decay": "rank_decay", "sweeps": "sweeps"}


def hss_from_args(args: argparse.Namespace) -> Any:
    """HSSOptions from the HSS flags that were given, or None when none was."""
    from hasslefree.hss import HSSOptions

    given = {field: getattr(args, flag) for flag, field in HSS_FLAGS.items() if getattr(args, flag) is not None}
    return HSSOptions.from_value(given) if given else None


def dtype_from_arg(name: str) -> Any:
    import torch

    return getattr(torch, name)


def device_from_arg(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise UsageError(f"device {name!r} requested but it is not available")
    return name


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def quiet_transformers() -> None:
    """No loading progress bars or notices from transformers under --quiet."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
