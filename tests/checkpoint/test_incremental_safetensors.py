"""The incremental safetensors writer against the library's own writer and reader."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hasslefree.checkpoint.incremental import IncrementalSafetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 13, generator=g),
        "b.bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "c.half": torch.randn(9, generator=g).half(),
        "d.double": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "e.index": torch.randint(-5, 5, (11,), generator=g, dtype=torch.int64),
        "f.packed": torch.randint(0, 255, (6, 4), generator=g, dtype=torch.uint8),
        "g.mask": torch.rand(3, 5, generator=g) > 0.5,
        "h.empty": torch.zeros(0, 4),
        "i.scalar": torch.tensor(3.5),
        "j.strided": torch.randn(8, 6, generator=g).t()[::2],  # not contiguous
        "k.int16": torch.randint(-300, 300, (3,), generator=g, dtype=torch.int16),
    }


def test_written_file_reads_back_bit_for_bit(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    with IncrementalSafetensors(path, {"format": "pt", "note": "hi"}) as out:
        for name, tensor in tensors.items():
            assert out.add(name, tensor) == tensor.numel() * tensor.element_size()
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no side files left


def test_duplicate_names_and_failures_leave_nothing_behind(tmp_path):
    path = tmp_path / "y.safetensors"
    with pytest.raises(ValueError, match="already written"):
        with IncrementalSafetensors(path) as out:
            out.add("t", torch.ones(2))
            out.add("t", torch.ones(2))
    with pytest.raises(ValueError, match="cannot be stored"):
        with IncrementalSafetensors(path) as out:
            out.add("c", torch.ones(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []
