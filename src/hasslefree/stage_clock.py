"""Wall time per named stage, accumulated in a plain ``dict[str, float]`` (a "clock") that the
caller owns: the layer solvers add "prepare", "P1", "P2" and "objective", the pipeline its
stages. ``None`` as the clock means: do not time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

Clock = dict[str, float]


def add_seconds(clock: Clock | None, key: str, began: float) -> None:
    """Add the seconds since ``began`` (a ``time.perf_counter()`` value) to ``clock[key]``."""
    if clock is not None:
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - began


@contextlib.contextmanager
def timed(clock: Clock | None, key: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``clock[key]``, also when it raises."""
    began = time.perf_counter()
    try:
        yield
    finally:
        add_seconds(clock, key, began)
