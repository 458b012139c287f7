"""Writing files so that a reader (or a resumed run) never sees half of one: write a temporary
file beside the target, fsync it, then move it into place with one ``os.replace``."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp)`` on a temporary file next to ``path``, fsync it, then ``os.replace``;
    on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (sets and tuples become lists, objects with
    ``to_dict`` and dataclasses their dicts, anything else its ``str``)."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)
