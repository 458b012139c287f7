"""Block-output matching: options, the per-block tuner, and the pipeline on every block."""

from __future__ import annotations

import json

import pytest
import torch

from hasslefree.nn import SparseLowRankLinear
from hasslefree.patterns import SparsityPattern
from hasslefree.pipeline import MatchOptions, compress, resolve_architecture
from hasslefree.pipeline.capture import capture_block_inputs, run_block
from hasslefree.pipeline.matching import match_block
from helpers import compress_interrupted, tiny_llama, token_batch

torch.set_num_threads(1)

CPU = torch.device("cpu")
COMMON = dict(pattern="2:4", rank=4, method="hassle-free-fast", iterations=3, progress=False)


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=-1), "epochs"), (dict(epochs=1.5), "epochs"), (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"), (dict(target="dense"), "target"), (dict(accumulate=0), "accumulate"),
    (dict(final_lr_fraction=2.0), "final_lr_fraction"),
])
def test_bad_options_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        MatchOptions(**bad)


def test_compress_rejects_bad_match_options_before_any_work():
    calls = []
    for match, message in [({"epcohs": 1}, "epcohs"), ({"target": "x", "epochs": 1}, "target"), ("2", "mapping")]:
        with pytest.raises(ValueError, match=message):
            compress(tiny_llama(), calibration=token_batch(2, 16), match=match,
                     on_block_end=lambda i, r: calls.append(i), **COMMON)
    with pytest.raises(ValueError, match="dense=True"):
        compress(tiny_llama(), calibration=token_batch(2, 16), match={"epochs": 1}, dense=True, **COMMON)
    assert calls == []


def _compressed_block_and_data(seed: int = 0):
    """Block 0 of a compressed tiny Llama, its calibration inputs and the dense block's outputs."""
    ids = token_batch(8, 24, seed=seed)
    dense = tiny_llama(seed=seed, num_hidden_layers=1)
    blocks = resolve_architecture(dense).block_list(dense)
    inputs = capture_block_inputs(dense, blocks, ids, batch_size=2, device=CPU, dtype=torch.float32)
    with torch.no_grad():
        targets = [run_block(blocks[0], h, inputs.call(0, h.shape[0]), CPU, torch.float32) for h in inputs.hidden]
    model = tiny_llama(seed=seed, num_hidden_layers=1)
    compress(model, calibration=ids, batch_size=2, **COMMON)
    block = resolve_architecture(model).block_list(model)[0]
    return block, inputs, targets


def _error(block, inputs, targets) -> float:
    with torch.no_grad():
        outs = [run_block(block, h, inputs.call(0, h.shape[0]), CPU, torch.float32) for h in inputs.hidden]
    return sum(float((o - t).pow(2).sum()) for o, t in zip(outs, targets)) / sum(float(t.pow(2).sum()) for t in targets)


def test_matching_lowers_the_block_error_and_keeps_the_support():
    block, inputs, targets = _compressed_block_and_data()
    layers = {n: m for n, m in block.named_modules() if isinstance(m, SparseLowRankLinear)}
    supports = {n: m.sparse_weight != 0 for n, m in layers.items()}
    factors = {n: (m.U.clone(), m.V.clone()) for n, m in layers.items()}
    before = _error(block, inputs, targets)
    record, outputs = match_block(block, 0, inputs.hidden, targets, lambda h: inputs.call(0, h.shape[0]), CPU,
                                  MatchOptions(epochs=4, lr=1e-3, accumulate=2), torch.float32)
    after = _error(block, inputs, targets)
    with torch.no_grad():
        expected = [run_block(block, h, inputs.call(0, h.shape[0]), CPU, torch.float32) for h in inputs.hidden]
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected))  # they are the next block's inputs
    assert record.kept and record.steps == 8
    assert record.loss_before == pytest.approx(before, rel=1e-5)
    assert record.loss_after == pytest.approx(after, rel=1e-5)
    assert after < 0.8 * before
    pattern = SparsityPattern.parse("2:4")
    for name, module in layers.items():
        kept = module.sparse_weight != 0
        assert bool((kept <= supports[name]).all()), name  # nothing outside the old support
        assert pattern.is_satisfied_by(kept)
        assert module.sparse_weight.dtype == torch.float32
        assert not torch.equal(module.U, factors[name][0])
    assert all(p.requires_grad for p in block.parameters())  # as before the run


def test_a_run_that_does_not_help_is_undone_bit_for_bit():
    block, inputs, targets = _compressed_block_and_data(seed=1)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    record, _ = match_block(block, 0, inputs.hidden, targets, lambda h: inputs.call(0, h.shape[0]), CPU,
                            MatchOptions(epochs=1, lr=10.0), torch.float32)  # a step this large overshoots
    assert not record.kept and record.loss_after == record.loss_before
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("target", ["block", "model"])
def test_every_block_is_matched_and_the_model_gets_closer_to_dense(target):
    ids = token_batch(8, 32)
    dense = tiny_llama(num_hidden_layers=4)
    with torch.no_grad():
        reference = dense(ids).logits
    plain, matched = tiny_llama(num_hidden_layers=4), tiny_llama(num_hidden_layers=4)
    compress(plain, calibration=ids, **COMMON)
    report = compress(matched, calibration=ids, match={"epochs": 3, "lr": 3e-4, "target": target, "accumulate": 2},
                      **COMMON)
    assert [m["block"] for m in report.matching] == [0, 1, 2, 3]
    assert all(m["kept"] and m["loss_after"] < m["loss_before"] for m in report.matching)
    assert report.timings["match"] > 0
    with torch.no_grad():
        gap_plain = float((plain(ids).logits - reference).pow(2).mean())
        gap_matched = float((matched(ids).logits - reference).pow(2).mean())
    assert gap_matched < gap_plain


def test_matched_run_resumes_bit_for_bit(tmp_path):
    ids = token_batch(4, 32)
    options = dict(calibration=ids, match={"epochs": 2, "lr": 1e-3, "target": "model", "accumulate": 2}, **COMMON)
    straight = tiny_llama(num_hidden_layers=3)
    compress(straight, out_dir=tmp_path / "straight", **options)
    compress_interrupted(tmp_path / "resumed", after_block=1, **options)
    resumed = tiny_llama(num_hidden_layers=3)
    report = compress(resumed, out_dir=tmp_path / "resumed", **options)
    assert report.resumed_blocks == 2 and [m["block"] for m in report.matching] == [0, 1, 2]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert saved["config"]["match"]["target"] == "model"


def test_tune_all_also_tunes_the_norms_and_keeps_their_dtype():
    for tune_all in (False, True):
        block, inputs, targets = _compressed_block_and_data()
        norms = {n: p.detach().clone() for n, p in block.named_parameters() if "norm" in n}
        assert norms
        record, _ = match_block(block, 0, inputs.hidden, targets, lambda h: inputs.call(0, h.shape[0]), CPU,
                                MatchOptions(epochs=4, lr=1e-3, accumulate=2, tune_all=tune_all), torch.float32)
        after = dict(block.named_parameters())
        changed = [n for n, p in norms.items() if not torch.equal(p, after[n])]
        assert all(after[n].dtype == p.dtype for n, p in norms.items())
        assert changed == ([] if not tune_all else list(norms)), tune_all
        assert record.kept and record.loss_after < record.loss_before
    assert "tune_all" not in MatchOptions(epochs=1).to_dict()  # older runs' config hashes stay valid
    assert MatchOptions(epochs=1, tune_all=True).to_dict()["tune_all"] is True
    with pytest.raises(ValueError, match="tune_all"):
        MatchOptions(tune_all="yes")
