"""A compression run's settings as one typed, JSON-serialisable object.

The CLI builds a :class:`Recipe` from its flags (or reads one with ``--recipe FILE``),
:func:`hasslefree.compress` takes one (its keyword settings are turned into one), and the run
report records it, so ``report.json``'s ``recipe`` reruns the same compression. Reading one is
strict: an unknown key anywhere, or a value of the wrong type, is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hasslefree.hss.options import HSSOptions
from hasslefree.pipeline.dense_targets import LAYER_TARGETS
from hasslefree.pipeline.matching import MatchOptions
from hasslefree.pipeline.plan import DEFAULT_SKIP
from hasslefree.rank_policy import RankPolicy

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strict(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` as a dict of ``cls``'s fields, or a ValueError naming the unknown keys."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return dict(data)


@dataclass(frozen=True)
class EngineOptions:
    """Per-layer solver settings; None leaves each at :func:`hasslefree.decompose_layer`'s default."""

    percdamp: float | None = None
    coordinate_damp: float | None = None
    tolerance: float | None = None
    patience: int | None = None
    sparse_solver: str | None = None
    lowrank_solver: str | None = None
    start: str | None = None
    sparse_options: Mapping[str, Any] | None = None
    lowrank_options: Mapping[str, Any] | None = None
    loop_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("percdamp", "coordinate_damp", "tolerance"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ValueError(f"engine option {name} must be a number, got {value!r}")
        if self.patience is not None and not _is_int(self.patience):
            raise ValueError(f"engine option patience must be an integer, got {self.patience!r}")
        for name in ("sparse_solver", "lowrank_solver", "start"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"engine option {name} must be a string, got {value!r}")
        for name in ("sparse_options", "lowrank_options", "loop_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"engine option {name} must be a mapping, got {value!r}")

    def given(self) -> dict[str, Any]:
        """The options that were set, as :func:`hasslefree.decompose_group` keywords."""
        return {f.name: (dict(v) if isinstance(v, Mapping) else v)
                for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a compression's result (not where it runs or what it prints).

    ``rank`` (a fixed rank), ``rho`` (compression ratio) and ``kappa`` (rank ratio, with
    ``rho``) choose the rank policy; none of them: 64 for sparse + low-rank methods, 0 for
    pruning-only ones. ``calib``/``nsamples``/``seqlen`` describe the calibration data when
    :func:`hasslefree.compress` builds it (explicit ``calibration`` token ids win).
    """

    pattern: str = "2:4"
    rank: int | None = None
    rho: float | None = None
    kappa: float | None = None
    method: str = "hassle-free"
    iterations: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skip: tuple[str, ...] = DEFAULT_SKIP
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)
    hss: HSSOptions | None = None
    match: MatchOptions = field(default_factory=MatchOptions)
    layer_target: str = "layer"
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    true_sequential: bool = True
    dense: bool = False
    activation_dtype: str = "float32"
    hessian_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ValueError(f"recipe pattern must be a string such as '2:4', got {self.pattern!r}")
        if not isinstance(self.method, str):
            raise ValueError(f"recipe method must be a string, got {self.method!r}")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 0):
            raise ValueError(f"recipe rank must be an integer >= 0, got {self.rank!r}")
        for name in ("rho", "kappa"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value)):
                raise ValueError(f"recipe {name} must be a finite number, got {value!r}")
        if self.rank is not None and self.rho is not None:
            raise ValueError("give either rank or rho, not both")
        if self.kappa is not None and self.rho is None:
            raise ValueError("kappa (the rank ratio) needs rho (the overall compression ratio)")
        if self.iterations is not None and (not _is_int(self.iterations) or self.iterations < 1):
            raise ValueError(f"recipe iterations must be an integer >= 1, got {self.iterations!r}")
        for name in ("seed", "nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or (name != "seed" and value < 1):
                raise ValueError(f"recipe {name} must be an integer{' >= 1' if name != 'seed' else ''}, got {value!r}")
        if self.seqlen < 2:
            raise ValueError(f"recipe seqlen must be >= 2 (a window predicts its tokens from earlier ones), got {self.seqlen}")
        for name in ("true_sequential", "dense"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"recipe {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("activation_dtype", "hessian_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(f"recipe {name} must be one of {', '.join(DTYPE_NAMES)}, got {getattr(self, name)!r}")
        if not isinstance(self.calib, str):
            raise ValueError(f"recipe calib must be a dataset name or a file path, got {self.calib!r}")
        if not isinstance(self.overrides, Mapping) or not all(isinstance(v, Mapping) for v in self.overrides.values()):
            raise ValueError("recipe overrides must map a layer regex to a mapping of settings")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"recipe skip must be a list of layer regexes, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.engine, EngineOptions):
            raise ValueError(f"recipe engine must be EngineOptions or a mapping of its fields, got "
                             f"{type(self.engine).__name__}")
        if self.hss is not None and not isinstance(self.hss, HSSOptions):
            raise ValueError(f"hss must be HSSOptions or a mapping of its fields, got {type(self.hss).__name__}")
        if not isinstance(self.match, MatchOptions):
            raise ValueError(f"match must be MatchOptions or a mapping of its fields, got {type(self.match).__name__}")
        if self.layer_target not in LAYER_TARGETS:
            raise ValueError(f"recipe layer_target must be one of {', '.join(LAYER_TARGETS)}, got {self.layer_target!r}")
        if self.match.enabled and self.dense:
            raise ValueError("block-output matching tunes the compressed modules; it cannot run with dense=True")

    # ------------------------------------------------------------------ views
    def rank_policy(self) -> int | RankPolicy | None:
        if self.kappa is not None:
            return RankPolicy.rank_ratio(self.kappa, self.rho)
        if self.rho is not None:
            return RankPolicy.compression(self.rho)
        return self.rank

    def dtype(self, name: str) -> torch.dtype:
        return getattr(torch, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; :meth:`from_dict` reads it back to an equal recipe."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        data["skip"] = list(self.skip)
        data["engine"] = self.engine.given()
        data["hss"] = self.hss.to_dict() if self.hss is not None else None
        data["match"] = self.match.to_dict()
        return json.loads(json.dumps(data))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        values = _strict(cls, data, "recipe")
        if "engine" in values:
            values["engine"] = EngineOptions(**_strict(EngineOptions, values["engine"] or {}, "recipe engine"))
        if values.get("hss") is not None:
            values["hss"] = HSSOptions(**_strict(HSSOptions, values["hss"], "recipe hss"))
        if "match" in values:
            values["match"] = MatchOptions(**_strict(MatchOptions, values["match"] or {}, "recipe match"))
        if "skip" in values and isinstance(values["skip"], Sequence) and not isinstance(values["skip"], str):
            values["skip"] = tuple(values["skip"])
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | Path, calib: str | None = None) -> "Recipe":
        """A recipe file (or a run's ``report.json``, whose ``recipe`` it takes). The file is
        untrusted: a calibration file it names must lie inside its folder (a relative path is
        read against that folder). ``calib`` (the caller's own choice) replaces it instead."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the recipe {path}: {exc}") from None
        if isinstance(data, Mapping) and "recipe" in data and "layers" in data:
            data = data["recipe"]
        recipe = cls.from_dict(data)
        if calib is not None:
            return dataclasses.replace(recipe, calib=str(calib))
        named = Path(recipe.calib)
        if not named.suffix and not named.is_absolute():  # a dataset name such as "c4"
            return recipe
        folder = path.resolve().parent
        resolved = (folder / named).resolve()
        if folder not in resolved.parents:
            raise ValueError(f"the recipe's calibration file {recipe.calib!r} lies outside the recipe's folder; "
                             "name the calibration data yourself (--calib PATH)")
        return dataclasses.replace(recipe, calib=str(resolved))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Recipe":
        """The recipe of :func:`hasslefree.compress`'s keyword form (``pattern=...``, ``rank=...``
        with an int or a RankPolicy, torch dtypes, HSS/match options or mappings, and the
        engine options such as ``percdamp``); an unknown keyword is a ValueError naming it."""
        values = dict(settings)
        engine_names = {f.name for f in dataclasses.fields(EngineOptions)}
        engine = {k: values.pop(k) for k in list(values) if k in engine_names}
        rank = values.pop("rank", None)
        if isinstance(rank, RankPolicy):
            if rank.kind == "fixed":
                values["rank"] = rank.rank
            else:
                values["rho"] = rank.rho
                if rank.kind != "ratio":
                    values["kappa"] = rank.kappa
        elif rank is not None:
            values["rank"] = rank
        for name in ("activation_dtype", "hessian_dtype"):
            if isinstance(values.get(name), torch.dtype):
                values[name] = str(values[name]).removeprefix("torch.")
        if values.get("hss") is not None:
            values["hss"] = HSSOptions.from_value(values["hss"])
        match = values.get("match")
        if match is None:
            values.pop("match", None)
        elif isinstance(match, Mapping):
            values["match"] = MatchOptions(**_strict(MatchOptions, match, "match"))
        if "calib" in values:
            values["calib"] = str(values["calib"])
        if values.get("overrides") is None:
            values.pop("overrides", None)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown compress setting(s) {', '.join(map(repr, unknown))}; see hasslefree.compress "
                             "and hasslefree.decompose_layer")
        return cls(**values, engine=EngineOptions(**engine))
