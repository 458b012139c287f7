"""The ``hasslefree`` command line: clear one-line errors before any work, and a full round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from hasslefree.cli import main, parse_overrides, UsageError

from helpers import stories_text

torch.set_num_threads(1)


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("hasslefree: error: ")
    return err[-1]


def test_unknown_model_path(tmp_path, capsys):
    line = _error(capsys, ["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"])
    assert "does not exist" in line


def test_architecture_it_cannot_handle(tmp_path, capsys, monkeypatch):
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery"})()
            self.proj = nn.Linear(4, 4)

    monkeypatch.setattr("hasslefree.evaluate.load_any", lambda *a, **k: (Mystery(), None))
    line = _error(capsys, ["compress", "mystery", "--out", str(tmp_path / "o"), "-q"])
    assert "cannot find the decoder blocks of Mystery" in line


def test_empty_and_too_short_calibration_text(tmp_path, capsys):
    stories_text()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _error(capsys, ["compress", "stories260K", "--out", str(tmp_path / "o"),
                                         "--calib", str(empty), "--rank", "8", "-q"])
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    line = _error(capsys, ["compress", "stories260K", "--out", str(tmp_path / "o"), "--calib", str(short),
                           "--seqlen", "256", "--rank", "8", "-q"])
    assert "needs at least 256" in line


def test_pattern_that_does_not_fit_names_the_layer(tmp_path, capsys):
    text = stories_text()
    line = _error(capsys, ["compress", "stories260K", "--out", str(tmp_path / "o"), "--calib", text,
                           "--pattern", "2:3", "--rank", "8", "-q"])
    assert "model.layers.0.self_attn.q_proj: input width 64 is not divisible by M=3" in line
    assert not (tmp_path / "o").exists()


def test_seqlen_beyond_context(tmp_path, capsys):
    text = stories_text()
    line = _error(capsys, ["compress", "stories260K", "--out", str(tmp_path / "o"), "--calib", text,
                           "--seqlen", "1024", "--rank", "8", "-q"])
    assert "exceeds the model's context of 512" in line


def test_bad_options(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "-q"]
    assert "--kappa needs --rho" in _error(capsys, ["compress", "stories260K", "--kappa", "0.3", *out])
    assert "expected REGEX=" in _error(capsys, ["compress", "stories260K", "--override", "rank:3", *out])
    assert "unknown method" in _error(capsys, ["compress", "stories260K", "--method", "nope", *out])
    assert "match lr" in _error(capsys, ["compress", "stories260K", "--match-epochs", "1", "--match-lr", "0", *out])
    assert "match epochs" in _error(capsys, ["compress", "stories260K", "--match-epochs", "-1", *out])
    assert "--no-modules" in _error(capsys, ["compress", "stories260K", "--match-epochs", "1", "--no-modules", *out])
    assert "unknown dataset" in _error(capsys, ["eval", "stories260K", "--ppl", "nosuchset", "-q"])


def test_layer_target_flag_reaches_the_run(tmp_path, capsys):
    text = stories_text()
    out = tmp_path / "moved"
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "stories260K", "--out", str(out), "--layer-target", "dense", "-q"])
    assert exit_info.value.code == 2 and "--layer-target" in capsys.readouterr().err
    assert main(["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "2", "--seqlen", "64",
                 "--rank", "4", "--method", "hassle-free-fast", "--iterations", "2", "--layer-target", "model",
                 "-q"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["layer_target"] == "model" and report["config"]["layer_target"] == "model"
    assert report["timings"]["dense targets"] > 0


def test_parse_overrides():
    assert parse_overrides(["mlp.down_proj=rank:32,pattern:4:8", r"o_proj$=skip"]) == {
        "mlp.down_proj": {"rank": 32, "pattern": "4:8"}, r"o_proj$": {"skip": True}}
    with pytest.raises(UsageError, match="integer"):
        parse_overrides(["x=rank:big"])


def test_compress_info_eval_export_round_trip(tmp_path, capsys):
    text = stories_text()
    out = tmp_path / "compressed"
    assert main(["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "4",
                 "--seqlen", "128", "--rank", "8", "--method", "hassle-free-exact", "--iterations", "2",
                 "--override", r"down_proj=rank:4", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("report.json", "report.png", "progress.json", "hasslefree_config.json"):
        assert (out / name).is_file()
    assert main(["info", str(out)]) == 0
    assert "TOTAL" in capsys.readouterr().out
    assert main(["eval", str(out), "--ppl", text, "--seqlen", "128", "--max-windows", "2", "-q"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and table.strip().splitlines()[-1].split()[-2] == "2"
    assert main(["export", str(out), "--to", "dense", str(tmp_path / "dense"), "-q"]) == 0
    assert (tmp_path / "dense" / "config.json").is_file()
    # Re-running the same command finds every block done and only rewrites the outputs.
    assert main(["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "4",
                 "--seqlen", "128", "--rank", "8", "--method", "hassle-free-exact", "--iterations", "2",
                 "--override", r"down_proj=rank:4", "-q"]) == 0
    line = _error(capsys, ["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "4",
                           "--seqlen", "128", "--rank", "8", "--method", "hassle-free-exact", "-q"])
    assert "different configuration" in line


def test_console_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hasslefree.cli", "compress", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hasslefree: error: model path")


def test_compress_in_bfloat16_keeps_bfloat16_activations_and_float32_maths(tmp_path, capsys):
    text = stories_text()
    out = tmp_path / "bf16"
    assert main(["compress", "stories260K", "--out", str(out), "--calib", text, "--nsamples", "2",
                 "--seqlen", "64", "--rank", "4", "--method", "hassle-free-fast", "--iterations", "2",
                 "--dtype", "bfloat16", "-q"]) == 0
    capsys.readouterr()
    import json
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["activation_dtype"] == "torch.bfloat16"
    assert report["config"]["hessian_dtype"] == "torch.float32"
    assert all(layer["relative_objective"] < 1 for layer in report["layers"])


def test_compress_streamed_from_a_saved_folder_equals_in_memory(tmp_path, capsys):
    text = stories_text()
    from hasslefree.loading import load_model

    model, tokenizer = load_model("stories260K")
    folder = tmp_path / "stories"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    argv = ["--calib", text, "--nsamples", "2", "--seqlen", "64", "--rank", "4", "--method", "hassle-free-fast",
            "--iterations", "1", "-q"]
    assert main(["compress", str(folder), "--out", str(tmp_path / "a"), *argv]) == 0
    assert main(["compress", str(folder), "--stream", "--out", str(tmp_path / "b"), *argv]) == 0
    capsys.readouterr()
    from hasslefree.checkpoint import load_compressed

    a, b = load_compressed(tmp_path / "a").state_dict(), load_compressed(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    line = _error(capsys, ["compress", "stories260K", "--stream", "--out", str(tmp_path / "c"), *argv])
    assert "config.json" in line


def test_distributed_outside_torchrun_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a cat. " * 50)
    base = ["compress", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o"), "--calib", str(text), "-q"]
    assert "launch with: torchrun" in _error(capsys, [*base, "--distributed"])
    assert not (tmp_path / "o").exists()
