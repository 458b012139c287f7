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
