"""Cutting a forward pass short: a hook raises :class:`StopForward` once it has recorded what it
wanted (a block's inputs, a layer's activations), and the caller runs the pass through
:func:`run_until_stopped`. One exception for every such hook, so none can catch another's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StopForward(Exception):
    """Raised from a forward hook: the rest of the forward pass need not run."""


def run_until_stopped(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Call ``forward``; True when a hook stopped it, False when it ran to the end."""
    try:
        forward(*args, **kwargs)
    except StopForward:
        return True
    return False
