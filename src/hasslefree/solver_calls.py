"""How the alternating loop calls a P1 or P2 solver, and each solver's typed options.

A solver declares exactly the keywords it uses. The loop supplies a few of its own (the last
sparse iterate ``previous``, the last factors ``warm``, the ``iteration`` number and the
layer's ``generator``); each solver receives only those it declares, so no solver needs a
catch-all ``**kwargs`` and a misspelt user option cannot vanish into one.

A solver's user options are its other keyword-only parameters; :func:`options_type` turns them
into a frozen dataclass (``SparsegptPruneOptions(blocksize=128, ...)``), so options given as a
mapping are checked by name and by type (int, float, bool) before any work.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

LOOP_KEYWORDS = frozenset({"previous", "warm", "iteration", "generator"})


@functools.lru_cache(maxsize=None)
def _keywords(solver: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """(keyword names the solver declares, whether it takes ``**kwargs``)."""
    params = inspect.signature(solver).parameters.values()
    names = frozenset(p.name for p in params
                      if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def loop_keywords(solver: Callable[..., Any], **supplied: Any) -> dict[str, Any]:
    """The part of the loop's ``supplied`` keywords that ``solver`` declares."""
    unknown = set(supplied) - LOOP_KEYWORDS
    if unknown:
        raise ValueError(f"not a loop keyword: {', '.join(sorted(unknown))}")
    names, takes_any = _keywords(solver)
    return {k: v for k, v in supplied.items() if takes_any or k in names}


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}


@functools.lru_cache(maxsize=None)
def options_type(solver: Callable[..., Any]) -> type:
    """The frozen dataclass of ``solver``'s options: one field per option, with its default."""
    params = [p for p in inspect.signature(solver).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in LOOP_KEYWORDS]
    fields = [(p.name, p.annotation if p.annotation is not inspect.Parameter.empty else Any,
               dataclasses.field(default=p.default)) for p in params]
    name = "".join(part.title() for part in solver.__name__.split("_")) + "Options"
    return dataclasses.make_dataclass(name, fields, frozen=True)


def typed_options(solver: Callable[..., Any], options: Mapping[str, Any] | None, kind: str = "solver") -> Any:
    """``options`` as ``solver``'s options dataclass; a ValueError names an unknown option or a
    value of the wrong type (ints, floats and bools are checked; bool is not an int here)."""
    cls = options_type(solver)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown {kind} option(s) {', '.join(map(repr, unknown))} for {solver.__name__}; "
                         f"it takes {', '.join(sorted(fields)) or 'none'}")
    for key, value in (options or {}).items():
        allowed = _SIMPLE_TYPES.get(str(fields[key].type))
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            raise ValueError(f"{kind} option {key} of {solver.__name__} must be {fields[key].type}, got {value!r}")
    return cls(**dict(options or {}))


def option_values(options: Any) -> dict[str, Any]:
    """A typed options object as the solver's keyword arguments."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
