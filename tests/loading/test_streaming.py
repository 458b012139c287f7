"""Streaming the decoder blocks from safetensors gives the same result as loading the whole model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hasslefree.checkpoint import load_compressed
from hasslefree.loading import open_streaming
from hasslefree.pipeline import ResumeMismatch, compress
from helpers import tiny_llama, token_batch

torch.set_num_threads(1)

OPTIONS = dict(rank=4, method="hassle-free-fast", iterations=2, progress=False)


class _Interrupt(Exception):
    pass


def _saved(tmp_path, **changes):
    model = tiny_llama(num_hidden_layers=3, **changes)
    model.save_pretrained(str(tmp_path / "model"))
    return model, tmp_path / "model"


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_run_equals_in_memory_run(tmp_path, tied):
    ids = token_batch(3, 32)
    model, folder = _saved(tmp_path, tie_word_embeddings=tied)
    streamed, weights = open_streaming(folder)
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    assert not any(p.is_meta for n, p in streamed.named_parameters() if not n.startswith("model.layers."))
    compress(model, calibration=ids, out_dir=tmp_path / "memory", **OPTIONS)
    report = compress(streamed, calibration=ids, out_dir=tmp_path / "streamed", block_weights=weights, **OPTIONS)
    assert len(report.layers) == 21 and "load" in report.timings
    assert all(p.is_meta for p in streamed.model.layers.parameters())  # written block by block, never whole
    loaded = load_compressed(tmp_path / "streamed", packed=False)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    stored = [load_file(str(tmp_path / run / "model.safetensors")) for run in ("memory", "streamed")]
    assert stored[0].keys() == stored[1].keys() and all(torch.equal(stored[0][k], stored[1][k]) for k in stored[0])


def test_streamed_run_resumes(tmp_path):
    ids = token_batch(2, 32)
    reference, folder = _saved(tmp_path)
    compress(reference, calibration=ids, out_dir=tmp_path / "straight", **OPTIONS)

    def stop(index, _records):
        if index == 1:
            raise _Interrupt

    model, weights = open_streaming(folder)
    with pytest.raises(_Interrupt):
        compress(model, calibration=ids, out_dir=tmp_path / "run", block_weights=weights, on_block_end=stop,
                 **OPTIONS)
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["completed_blocks"] == 2
    model, weights = open_streaming(folder)
    report = compress(model, calibration=ids, out_dir=tmp_path / "run", block_weights=weights, **OPTIONS)
    assert report.resumed_blocks == 2
    a, b = reference.state_dict(), load_compressed(tmp_path / "run", packed=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, weights = open_streaming(folder)
    with pytest.raises(ResumeMismatch):
        compress(model, calibration=ids, out_dir=tmp_path / "run", block_weights=weights, **{**OPTIONS, "rank": 2})


def test_streaming_errors_are_clear(tmp_path):
    _, folder = _saved(tmp_path)
    model, weights = open_streaming(folder)
    with pytest.raises(ValueError, match="needs out_dir"):
        compress(model, calibration=token_batch(1, 16), block_weights=weights, **OPTIONS)
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_streaming(tmp_path)
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        open_streaming(folder)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_streaming_finds_the_blocks_of_other_layouts(tmp_path, family):
    from helpers import tiny_model

    model = tiny_model(family, num_hidden_layers=2) if family == "opt" else tiny_model(family)
    model.save_pretrained(str(tmp_path / "model"))
    streamed, weights = open_streaming(tmp_path / "model")
    from hasslefree.pipeline import resolve_architecture

    path = resolve_architecture(streamed).blocks
    assert path == weights.prefix and all(p.is_meta for p in streamed.get_submodule(path).parameters())
    ids = token_batch(2, 16)
    compress(model, calibration=ids, out_dir=tmp_path / "memory", **OPTIONS)
    compress(streamed, calibration=ids, out_dir=tmp_path / "streamed", block_weights=weights, **OPTIONS)
    a, b = load_compressed(tmp_path / "memory", packed=False).state_dict(), load_compressed(tmp_path / "streamed", packed=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_that_lacks_a_block_tensor_fails_on_opening(tmp_path):
    _, folder = _saved(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):  # before any block is read
        open_streaming(folder)
    with pytest.raises(ValueError, match="no block list"):
        open_streaming(folder, blocks_path="model.nothing")
