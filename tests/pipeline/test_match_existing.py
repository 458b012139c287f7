"""Matching an already compressed model (``match_compressed``, ``hasslefree match``)."""

from __future__ import annotations

import json

import pytest
import torch

from hasslefree.cli import main
from hasslefree.checkpoint import load_compressed, save_compressed
from hasslefree.pipeline import MatchOptions, compress, resolve_architecture
from hasslefree.pipeline.capture import block_output
import hasslefree.pipeline.match_existing as match_existing
from hasslefree.pipeline.match_existing import check_pair, match_compressed
from helpers import assert_same_state, stories_text, tiny_llama, token_batch

torch.set_num_threads(1)

COMMON = dict(pattern="2:4", rank=4, method="hassle-free-fast", iterations=3, progress=False)
BLOCKS = 4


def _compressed(ids: torch.Tensor, blocks: int = BLOCKS) -> torch.nn.Module:
    model = tiny_llama(num_hidden_layers=blocks)
    compress(model, calibration=ids, **COMMON)
    return model


def _block_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output on ``ids``, from plain forward hooks."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outputs.append(block_output(out).detach()))
               for b in resolve_architecture(model).block_list(model)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.mark.parametrize("target", ["block", "model"])
def test_every_block_is_tuned_on_the_tuned_chain_and_the_model_gets_closer(target):
    ids = token_batch(6, 32)
    dense = tiny_llama(num_hidden_layers=BLOCKS)
    plain, model = _compressed(ids), _compressed(ids)
    run = match_compressed(model, dense, ids, options=MatchOptions(epochs=3, lr=3e-4, target=target, accumulate=2),
                           progress=False)
    assert [m.block for m in run.matching] == list(range(BLOCKS))
    assert all(m.kept and m.loss_after < m.loss_before for m in run.matching)
    assert run.timings["match"] > 0 and run.resumed_blocks == 0
    assert run.timings["match"] <= run.timings["total"]
    ours, dense_out = _block_outputs(model, ids), _block_outputs(dense, ids)
    for index, record in enumerate(run.matching):  # every block's record is its error on the tuned chain
        if target == "model":
            expected = _relative(ours[index], dense_out[index])
        else:
            expected = _dense_block_error(model, dense, ids, index)
        assert record.loss_after == pytest.approx(expected, rel=1e-4), index
    with torch.no_grad():
        reference = dense(ids).logits
        assert float((model(ids).logits - reference).pow(2).mean()) < float((plain(ids).logits - reference).pow(2).mean())


def _dense_block_error(model, dense, ids, index) -> float:
    """Relative error of ``model``'s block ``index`` against the dense block on the same inputs."""
    seen = {}
    blocks = resolve_architecture(model).block_list(model)
    dense_block = resolve_architecture(dense).block_list(dense)[index]

    def grab(_m, args, kwargs, out):
        with torch.no_grad():
            seen["dense"] = block_output(dense_block(*args, **kwargs))
        seen["ours"] = block_output(out)

    handle = blocks[index].register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    return _relative(seen["ours"], seen["dense"])


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    ids = token_batch(4, 32)
    options = MatchOptions(epochs=2, lr=1e-3, target="model", accumulate=2)
    dense = tiny_llama(num_hidden_layers=3)
    straight = _compressed(ids, blocks=3)
    match_compressed(straight, dense, ids, options=options, out_dir=tmp_path / "straight", progress=False)

    real = match_existing.match_block

    def dies_in_block_2(block, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return real(block, index, *args, **kwargs)

    monkeypatch.setattr(match_existing, "match_block", dies_in_block_2)
    with pytest.raises(KeyboardInterrupt):
        match_compressed(_compressed(ids, blocks=3), dense, ids, options=options, out_dir=tmp_path / "b",
                         progress=False)
    monkeypatch.setattr(match_existing, "match_block", real)
    resumed = _compressed(ids, blocks=3)
    run = match_compressed(resumed, dense, ids, options=options, out_dir=tmp_path / "b", progress=False)
    assert run.resumed_blocks == 2 and [m.block for m in run.matching] == [0, 1, 2]
    assert_same_state(straight, resumed)
    with pytest.raises(ValueError, match="different configuration"):
        match_compressed(_compressed(ids, blocks=3), dense, ids, options=MatchOptions(epochs=1), out_dir=tmp_path / "b",
                         progress=False)


def test_a_model_that_is_not_the_source_is_refused():
    ids = token_batch(2, 16)
    model = _compressed(ids)
    with pytest.raises(ValueError, match="blocks"):
        check_pair(model, tiny_llama(num_hidden_layers=BLOCKS - 1))
    with pytest.raises(ValueError, match="embeddings"):
        check_pair(model, tiny_llama(seed=5, num_hidden_layers=BLOCKS))
    with pytest.raises(ValueError, match="no SparseLowRankLinear"):
        check_pair(tiny_llama(num_hidden_layers=BLOCKS), tiny_llama(num_hidden_layers=BLOCKS))
    with pytest.raises(ValueError, match="epochs"):
        match_compressed(model, tiny_llama(num_hidden_layers=BLOCKS), ids, options=MatchOptions(epochs=0))


def test_cli_match_writes_a_tuned_checkpoint_and_leaves_the_source(tmp_path, capsys):
    text = stories_text()
    source, out = tmp_path / "compressed", tmp_path / "matched"
    calib = ["--calib", text, "--nsamples", "2", "--seqlen", "64"]
    assert main(["compress", "stories260K", "--out", str(source), *calib, "--rank", "4", "--method",
                 "hassle-free-fast", "--iterations", "2", "-q"]) == 0
    before = load_compressed(source, packed=False).state_dict()
    assert main(["match", str(source), "--out", str(out), *calib, "--epochs", "2", "--lr", "1e-3", "-q"]) == 0
    assert "matched" in capsys.readouterr().out
    after = load_compressed(source, packed=False).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the source is left as it was
    tuned = load_compressed(out, packed=False).state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before)
    report = json.loads((out / "match_report.json").read_text())
    assert report["options"]["epochs"] == 2 and len(report["matching"]) > 0
    assert all(m["loss_after"] <= m["loss_before"] for m in report["matching"])
    for argv, message in [(["--out", str(source)], "must differ"), (["--out", str(out), "--epochs", "0"], "epochs"),
                          (["--out", str(out), "--lr", "-1"], "lr")]:
        assert main(["match", str(source), *argv, *calib, "-q"]) == 2
        assert message in capsys.readouterr().err
    assert main(["match", str(tmp_path), "--out", str(out), "-q"]) == 2
    assert "not a compressed checkpoint" in capsys.readouterr().err


def test_a_checkpoint_of_an_unknown_source_needs_dense(tmp_path, capsys):
    ids = token_batch(2, 16)
    model = _compressed(ids)
    save_compressed(model, tmp_path / "c", run_config={"model": "/somewhere/else"})
    assert main(["match", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "--dense" in capsys.readouterr().err


def test_summary_reports_the_wall_time_not_the_stages_plus_their_total():
    from hasslefree.pipeline.match_existing import MatchRun
    from hasslefree.pipeline.matching import MatchRecord

    records = [MatchRecord(0, 0.4, 0.3, 8, 2.0, True), MatchRecord(1, 0.2, 0.2, 8, 1.0, False)]
    run = MatchRun(records, {"capture": 1.0, "match": 3.0, "total": 5.0}, resumed_blocks=0)
    assert run.mean_errors() == pytest.approx((0.3, 0.25))
    assert run.summary() == "matched 1/2 blocks: mean relative output error 0.3 -> 0.25 in 5 s"
