"""How the alternating loop calls a P1 or P2 solver.

A solver declares exactly the keywords it uses. The loop supplies a few of its own (the last
sparse iterate ``previous``, the last factors ``warm``, the ``iteration`` number and the
layer's ``generator``); each solver receives only those it declares, so no solver needs a
catch-all ``**kwargs`` and a misspelt user option cannot vanish into one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

LOOP_KEYWORDS = frozenset({"previous", "warm", "iteration", "generator"})


@functools.lru_cache(maxsize=None)
def _keywords(solver: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """(keyword names the solver declares, whether it takes ``**kwargs``)."""
    params = inspect.signature(solver).parameters.values()
    names = frozenset(p.name for p in params
                      if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def option_names(solver: Callable[..., Any]) -> frozenset[str]:
    """The options a user may set for ``solver``: its keyword-only parameters that the loop
    does not supply itself."""
    params = inspect.signature(solver).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY) - LOOP_KEYWORDS


def loop_keywords(solver: Callable[..., Any], **supplied: Any) -> dict[str, Any]:
    """The part of the loop's ``supplied`` keywords that ``solver`` declares."""
    unknown = set(supplied) - LOOP_KEYWORDS
    if unknown:
        raise ValueError(f"not a loop keyword: {', '.join(sorted(unknown))}")
    names, takes_any = _keywords(solver)
    return {k: v for k, v in supplied.items() if takes_any or k in names}
