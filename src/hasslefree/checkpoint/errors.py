"""The one exception type for unreadable or inconsistent checkpoints."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or inconsistent.

    The message always starts with the offending path so users know which file to fix.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")
