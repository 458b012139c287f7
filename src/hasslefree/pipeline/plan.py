"""Which layers get compressed, with which settings: defaults, regex overrides, skips.

The whole plan is built and validated before any block is touched, so a pattern that does
not fit some late layer's width fails in seconds, naming the layer, not after hours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hasslefree.decompose import resolve_layer
from hasslefree.hss.options import HSS_METHODS, HSSOptions, is_hss_method
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import PRESETS, get_method
from hasslefree.rank_policy import RankPolicy
from hasslefree.architectures.layer_kinds import is_linear_like
from hasslefree.pipeline.layers import layer_shape
from hasslefree.architectures import Architecture

logger = logging.getLogger(__name__)

DEFAULT_RANK = 64
DEFAULT_SKIP = (r"(^|\.)lm_head$", r"(^|\.)embed")
OVERRIDE_KEYS = frozenset({"pattern", "rank", "method", "iterations", "skip"})


def check_method(name: str) -> None:
    """A sparse + low-rank preset or a sparse + HSS variant; ValueError listing both otherwise."""
    if is_hss_method(name):
        return
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)} "
                         f"or an HSS method: {', '.join(HSS_METHODS)}")


@dataclass(frozen=True)
class LayerSettings:
    """What one layer is asked for; ``rank`` None means the method's default.

    HSS methods take their settings from ``hss`` (filled in for them, None for the others);
    ``pattern``, ``rank`` and ``iterations`` do not apply to them.
    """

    pattern: SparsityPattern
    rank: RankPolicy | None
    method: str
    iterations: int | None
    hss: HSSOptions | None = None

    @property
    def is_hss(self) -> bool:
        return is_hss_method(self.method)

    def layer_arguments(self) -> dict[str, Any]:
        """This layer's own :func:`hasslefree.decompose_group` arguments (the run-wide engine
        options come on top)."""
        return {"pattern": self.pattern, "rank": self.rank_policy(), "method": self.method,
                "iterations": self.iterations}

    def rank_policy(self) -> RankPolicy:
        if self.rank is not None:
            return self.rank
        return RankPolicy.fixed(0 if get_method(self.method).prunes_only else DEFAULT_RANK)

    def describe(self) -> dict[str, Any]:
        if self.is_hss:
            return {"method": self.method, "hss": (self.hss or HSSOptions()).to_dict()}
        return {"pattern": str(self.pattern), "rank": policy_text(self.rank_policy()), "method": self.method,
                "iterations": self.iterations}


@dataclass(frozen=True)
class TargetLayer:
    """A layer to compress: full and block-relative names, shape, settings, resolved budget."""

    name: str
    relative: str
    block: int
    group: int
    out_features: int
    in_features: int
    settings: LayerSettings
    rank: int
    pattern: SparsityPattern


@dataclass(frozen=True)
class Plan:
    """Per block, per shared-input group, the targeted layers (empty groups dropped)."""

    architecture: Architecture
    blocks: tuple[tuple[tuple[TargetLayer, ...], ...], ...]

    @property
    def layers(self) -> list[TargetLayer]:
        return [t for block in self.blocks for group in block for t in group]


def as_rank_policy(rank: int | RankPolicy | None) -> RankPolicy | None:
    if rank is None or isinstance(rank, RankPolicy):
        return rank
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int or a RankPolicy, got {rank!r}")
    return RankPolicy.fixed(rank)


def normalise_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[re.Pattern, dict]]:
    """Compile override regexes and check their keys and values up front."""
    compiled = []
    for regex, values in (overrides or {}).items():
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise ValueError(f"override {regex!r} is not a valid regular expression: {exc}") from None
        unknown = set(values) - OVERRIDE_KEYS
        if unknown:
            raise ValueError(f"override {regex!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(sorted(OVERRIDE_KEYS))}")
        clean = dict(values)
        if "pattern" in clean:
            clean["pattern"] = SparsityPattern.parse(clean["pattern"])
        if "rank" in clean:
            clean["rank"] = as_rank_policy(clean["rank"])
        if "method" in clean:
            check_method(clean["method"])
        iterations = clean.get("iterations")
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
            raise ValueError(f"override {regex!r}: iterations must be an integer >= 1, got {iterations!r}")
        compiled.append((pattern, clean))
    return compiled


def compile_skips(skip: Sequence[str]) -> list[re.Pattern]:
    """The skip regexes, compiled, or a ValueError naming the one that is not a regex."""
    compiled = []
    for regex in skip:
        try:
            compiled.append(re.compile(regex))
        except (re.error, TypeError) as exc:
            raise ValueError(f"skip {regex!r} is not a valid regular expression: {exc}") from None
    return compiled


def build_plan(model: nn.Module, arch: Architecture, defaults: LayerSettings,
               overrides: Mapping[str, Mapping[str, Any]] | None = None,
               skip: Sequence[str] = DEFAULT_SKIP) -> Plan:
    """Resolve every targeted layer's settings and check them all; raise on the first problems.

    When the run's method is an HSS method, only each block's first shared-input group (the
    attention input projections: q/k/v, or a fused qkv) is targeted by default, as in the
    HSS paper; an override with ``skip: False`` brings other layers in.
    """
    rules = normalise_overrides(overrides)
    skips = compile_skips(skip)
    blocks = arch.block_list(model)
    problems: list[str] = []
    plan_blocks = []
    for index, block in enumerate(blocks):
        groups = []
        for group_index, group in enumerate(arch.groups):
            members = []
            for relative in group:
                name = f"{arch.blocks}.{index}.{relative}"
                module = block.get_submodule(relative)
                if not is_linear_like(module):
                    problems.append(f"{name}: {type(module).__name__} is not a Linear or Conv1D layer")
                    continue
                outside = defaults.is_hss and group_index > 0
                settings, skipped = _settings_for(name, defaults, rules, skips, outside)
                if skipped:
                    continue
                target = _check(name, relative, index, group_index, module, settings, problems)
                if target is not None:
                    members.append(target)
            if members:
                groups.append(tuple(members))
        plan_blocks.append(tuple(groups))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    plan = Plan(arch, tuple(plan_blocks))
    if not plan.layers:
        raise ValueError("no layer is left to compress: every targeted layer is skipped")
    return plan


def _settings_for(name: str, defaults: LayerSettings, rules: list[tuple[re.Pattern, dict]],
                  skips: list[re.Pattern], skip_by_default: bool = False) -> tuple[LayerSettings, bool]:
    values = {"pattern": defaults.pattern, "rank": defaults.rank, "method": defaults.method,
              "iterations": defaults.iterations,
              "skip": skip_by_default or any(s.search(name) for s in skips)}
    for regex, override in rules:  # later rules win
        if regex.search(name):
            values.update(override)
    skipped = bool(values.pop("skip"))
    values["hss"] = (defaults.hss or HSSOptions()) if is_hss_method(values["method"]) else None
    return LayerSettings(**values), skipped


def _check(name: str, relative: str, block: int, group: int, module: nn.Module, settings: LayerSettings,
           problems: list[str]) -> TargetLayer | None:
    out_features, in_features = layer_shape(module)
    if settings.is_hss:
        return _check_hss(name, relative, block, group, out_features, in_features, settings, problems)
    try:
        rank, pattern = resolve_layer(out_features, in_features, settings.pattern, settings.rank_policy(),
                                      settings.method, name=name)
    except ValueError as exc:
        problems.append(str(exc))
        return None
    return TargetLayer(name, relative, block, group, out_features, in_features, settings, rank, pattern)


def _check_hss(name: str, relative: str, block: int, group: int, out_features: int, in_features: int,
               settings: LayerSettings, problems: list[str]) -> TargetLayer | None:
    """An HSS layer: its outer rank (from the budget when one is given) and S's exact size."""
    options = settings.hss or HSSOptions()
    shape = (out_features, in_features)
    try:
        outer_rank = options.outer_rank_for(shape)
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None
    nonzeros = options.sparse_count(shape)
    pattern = SparsityPattern("unstructured", density=nonzeros / (out_features * in_features), nonzeros=nonzeros)
    return TargetLayer(name, relative, block, group, out_features, in_features, settings, outer_rank, pattern)


def policy_text(policy: RankPolicy | None) -> str:
    """A short human form of a rank policy ("64", "rho=0.5"; None: the method's default)."""
    if policy is None:
        return "default"
    if policy.kind == "fixed":
        return str(policy.rank)
    if policy.kind == "ratio":
        return f"rho={policy.rho:g}"
    return f"kappa={policy.kappa:g},rho={policy.rho:g}"
