"""A safetensors file written one tensor at a time, so no state dict is ever held whole.

safetensors puts a JSON header (names, dtypes, shapes, byte offsets) before the data, and the
offsets are only known once every tensor is seen. The data therefore goes to a side file as it
comes; ``close`` writes header + data into a temp file and moves it into place atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from hasslefree.checkpoint.files import SAFETENSORS_DTYPES

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 64 * 2**20


class IncrementalSafetensors:
    """``add(name, tensor)`` repeatedly, then ``close()``; or use it as a context manager."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._data_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.data")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append one tensor's bytes; return how many."""
        if name in self._entries or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is already written or reserved")
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype not in _CODES:
            raise ValueError(f"{name}: dtype {data.dtype} cannot be stored in safetensors")
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        self._data.write(memoryview(raw))
        size = data.numel() * data.element_size()
        self._entries[name] = {"dtype": _CODES[data.dtype], "shape": list(data.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        return size

    def close(self) -> None:
        """Write the header and the data into ``path`` (atomically) and drop the side file."""
        self._data.close()
        header = dict(self._entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as out, open(self._data_path, "rb") as data:
                out.write(len(raw).to_bytes(8, "little"))
                out.write(raw)
                shutil.copyfileobj(data, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, self._data_path):
                if leftover.exists():
                    leftover.unlink()

    def abort(self) -> None:
        self._data.close()
        if self._data_path.exists():
            self._data_path.unlink()

    def __enter__(self) -> "IncrementalSafetensors":
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
