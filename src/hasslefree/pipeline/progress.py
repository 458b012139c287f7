"""Progress bars for the pipeline's loops: tqdm on a terminal, a silent stand-in elsewhere."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar when asked for and stderr is a terminal, else a silent stand-in."""
    enabled = enabled and sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if enabled:
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return _Silent(iterable)


class _Silent:
    def __init__(self, iterable) -> None:
        self.iterable = iterable if iterable is not None else ()

    def __iter__(self):
        return iter(self.iterable)

    def update(self, _n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
