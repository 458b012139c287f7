"""HSS methods in the sequential pipeline and the CLI, on tiny random models and stories260K."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hasslefree.cli import main
from hasslefree.hss import HSSLinear, HSSOptions, RankRule, outer_rank_for_budget
from hasslefree.nn import SparseLowRankLinear
from hasslefree.pipeline import ResumeMismatch, compress, prepare
from hasslefree.checkpoint import load_compressed
from helpers import assert_same_state, compress_interrupted, stories_text, tiny_llama, tiny_model, token_batch

torch.set_num_threads(1)

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
REST = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SMALL = {"sparsity": 0.3, "outer_rank": 8, "leaf": 16, "min_rank": 2}


@pytest.mark.parametrize("method", ["shss", "shss-rcm", "shss-rcm-whitened"])
def test_hss_method_targets_qkv_only(method):
    ids = token_batch()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compress(model, calibration=ids, method=method, hss=SMALL, progress=False)
    assert len(report.layers) == 6
    for i, block in enumerate(model.model.layers):
        for name in QKV:
            layer = block.get_submodule(name)
            assert isinstance(layer, HSSLinear) and layer.config["variant"] == method
            assert layer.config["outer_rank"] == 8 and layer.config["leaf"] == 16
        for name in REST:
            key = f"model.layers.{i}.{name}.weight"
            assert type(block.get_submodule(name)) is nn.Linear
            assert torch.equal(model.state_dict()[key], before[key])
    for record in report.layers:
        assert record.method == method and record.rank == 8
        assert 0 < record.relative_objective < 0.2
        layer = model.get_submodule(record.name)
        assert record.parameters == layer.parameter_count(include_bias=False)
    assert report.config["hss"] == HSSOptions(**SMALL).to_dict() and report.config["pattern"] == "hss"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_data_aware_variant_fits_the_layer_objective_better():
    """Block 0 sees the same inputs in both runs, so its layers solve identical problems."""
    ids = token_batch()
    errors = {}
    for method in ("shss-rcm", "shss-rcm-whitened"):
        report = compress(tiny_llama(), calibration=ids, method=method, hss=SMALL, progress=False)
        errors[method] = [r.relative_objective for r in report.layers if r.block == 0]
    assert all(w < f for w, f in zip(errors["shss-rcm-whitened"], errors["shss-rcm"]))


def test_budget_picks_the_outer_rank():
    ids = token_batch(2, 32)
    model = tiny_llama()
    report = compress(model, calibration=ids, method="shss", hss={"sparsity": 0.3, "budget": 0.9, "leaf": 16,
                                                                 "min_rank": 2}, progress=False)
    for record in report.layers:
        shape = record.shape
        assert record.parameters <= int(0.9 * shape[0] * shape[1])
        assert record.rank == outer_rank_for_budget(shape, 0.3, int(0.9 * shape[0] * shape[1]), 16,
                                                    RankRule(min_rank=2))
        assert model.get_submodule(record.name).config["budget_params"] == int(0.9 * shape[0] * shape[1])


def test_overrides_mix_hss_with_sparse_plus_low_rank():
    ids = token_batch(2, 32)
    model = tiny_llama()
    report = compress(model, calibration=ids, pattern="2:4", rank=4, method="hassle-free-exact", iterations=1,
                      overrides={r"q_proj$": {"method": "shss-rcm-whitened"}}, hss=SMALL, progress=False)
    assert len(report.layers) == 14
    for block in model.model.layers:
        assert isinstance(block.self_attn.q_proj, HSSLinear)
        assert all(isinstance(block.get_submodule(n), SparseLowRankLinear) for n in (*QKV[1:], *REST))
    # With an HSS run method, an override brings o_proj in (as HSS too).
    model = tiny_llama()
    report = compress(model, calibration=ids, method="shss", hss=SMALL,
                      overrides={r"o_proj$": {"skip": False}}, progress=False)
    assert len(report.layers) == 8 and isinstance(model.model.layers[1].self_attn.o_proj, HSSLinear)


def test_fused_qkv_of_gpt2_and_dense_write_back():
    ids = token_batch(2, 32)
    factored, merged = tiny_model("gpt2", n_layer=1), tiny_model("gpt2", n_layer=1)
    options = dict(calibration=ids, method="shss-rcm", hss=SMALL, progress=False)
    compress(factored, **options)
    compress(merged, dense=True, **options)
    module = factored.transformer.h[0].attn.c_attn
    conv = merged.transformer.h[0].attn.c_attn
    assert isinstance(module, HSSLinear) and module.shape == (192, 64) and type(conv).__name__ == "Conv1D"
    torch.testing.assert_close(conv.weight.t(), module.to_dense(), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, factored(ids).logits, atol=1e-4, rtol=1e-4)


BAD = [
    (dict(hss={"sparsity": 1.0}), "sparsity must be in"),
    (dict(hss={"outer_rank": 8, "budget": 0.5}), "not both"),
    (dict(hss={"leaf": 0}), "leaf must be"),
    (dict(hss={"rank": 8}), "unknown HSS option"),
    (dict(hss={"budget": 0.05, "leaf": 16}), r"model\.layers\.0\.self_attn\.q_proj: budget \d+ is below"),
    (dict(method="hassle-free-exact", rank=4, hss=SMALL), "no layer uses an HSS method"),
    (dict(rank=8), "rank does not apply to HSS"),
    (dict(iterations=3), "iterations do not apply"),
    (dict(method="shss-nope"), "or an HSS method: shss, shss-rcm"),
    (dict(overrides={"q_proj": {"method": "hss"}}), "unknown method 'hss'"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_hss_options_fail_before_any_work(kwargs, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress(model, calibration=token_batch(2, 32), **{"method": "shss", **kwargs}, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_plan_describes_hss_layers(caplog):
    plan = prepare(tiny_llama(), method="shss-rcm-whitened", hss={"sparsity": 0.25, "outer_rank": 4, "leaf": 8})
    target = plan.layers[0]
    assert target.rank == 4 and target.pattern.nonzeros == int(0.25 * 64 * 64)
    assert target.settings.describe()["hss"]["sparsity"] == 0.25
    assert "store at least as many values" not in caplog.text
    prepare(tiny_llama(), method="shss", hss={"outer_rank": 512})  # leaf 256: one dense leaf plus S
    assert "6 HSS layer(s) would store at least as many values as their dense weight" in caplog.text


def test_resume_and_reload_bit_for_bit(tmp_path):
    ids = token_batch(3, 32)
    options = dict(calibration=ids, method="shss-rcm-whitened", hss=SMALL, progress=False)
    straight = tiny_llama(num_hidden_layers=3)
    compress(straight, out_dir=tmp_path / "straight", **options)
    compress_interrupted(tmp_path / "resumed", after_block=0, **options)
    resumed = tiny_llama(num_hidden_layers=3)
    report = compress(resumed, out_dir=tmp_path / "resumed", **options)
    assert report.resumed_blocks == 1 and len(report.layers) == 9
    assert isinstance(resumed.model.layers[0].self_attn.q_proj, HSSLinear)
    assert_same_state(straight, resumed)
    loaded = load_compressed(tmp_path / "resumed")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, straight(ids).logits)
    with pytest.raises(ResumeMismatch, match="changed: hss"):
        compress(tiny_llama(num_hidden_layers=3), out_dir=tmp_path / "resumed",
                 **{**options, "hss": {**SMALL, "sparsity": 0.2}})


# ----------------------------------------------------------------- CLI (stories260K)
def test_cli_compress_info_eval(tmp_path, capsys):
    text = stories_text()
    out = tmp_path / "hss"
    argv = ["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "4", "--seqlen", "128",
            "--method", "shss-rcm-whitened", "--sparsity", "0.3", "--outer-rank", "8", "--leaf", "16", "-q"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 15 and {r["method"] for r in report["layers"]} == {"shss-rcm-whitened"}
    assert main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    assert "shss-rcm-whitened s=0.3 leaf=16" in table and "TOTAL" in table
    assert main(["eval", str(out), "--ppl", text, "--seqlen", "128", "--max-windows", "2", "-q"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--method", "shss", "--sparsity", "1.5"], "sparsity must be in"),
    (["--method", "shss", "--leaf", "0"], "leaf must be"),
    (["--method", "hassle-free", "--rank", "8", "--sparsity", "0.3"], "no layer uses an HSS method"),
    (["--method", "shss", "--rank", "8"], "rank does not apply to HSS"),
    (["--method", "shss", "--hss-budget", "0.01", "--leaf", "16"], "q_proj: budget"),
])
def test_cli_bad_hss_options(tmp_path, capsys, extra, message):
    text = stories_text()
    code = main(["compress", "stories260K", "--out", str(tmp_path / "o"), "--calib", text, "--seqlen", "128", *extra,
                 "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("hasslefree: error: ") and message in err[-1], err
    assert not (tmp_path / "o").exists()
