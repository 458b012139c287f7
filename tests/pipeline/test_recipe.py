"""The Recipe: JSON round trips, strict reading, the keyword form of compress() as the same
recipe, the report recording it, and ``hasslefree compress --recipe`` repeating a run."""

from __future__ import annotations

import json

import pytest
import torch

from hasslefree.cli import main
from hasslefree.hss import HSSOptions
from hasslefree.pipeline import MatchOptions, compress
from hasslefree.pipeline.recipe import EngineOptions, Recipe
from hasslefree.rank_policy import RankPolicy
from helpers import stories_text, tiny_llama, token_batch

torch.set_num_threads(1)

RECIPES = [
    Recipe(),
    Recipe(pattern="4:8", rank=16, method="hassle-free-fast", iterations=3, seed=7, nsamples=4, seqlen=64,
           overrides={"down_proj": {"rank": 8, "pattern": "2:4"}}, skip=("o_proj",),
           engine=EngineOptions(percdamp=0.02, coordinate_damp=0.005, tolerance=0.0, loop_options={"refresh_every": 2}),
           match=MatchOptions(epochs=1, lr=3e-4, target="model"), activation_dtype="bfloat16"),
    Recipe(pattern="2:8", rho=0.5, method="oats", true_sequential=False, batch_size=2, layer_target="model"),
    Recipe(pattern="unstructured:0.5", rho=0.5, kappa=0.3, method="hassle-free-exact"),
    Recipe(method="shss", hss=HSSOptions(sparsity=0.2, outer_rank=64, leaf=32)),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_json_round_trip(recipe):
    text = json.dumps(recipe.to_dict())
    again = Recipe.from_dict(json.loads(text))
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize("data, message", [
    ({"ptatern": "2:4"}, "ptatern"),
    ({"engine": {"percdmap": 0.1}}, "percdmap"),
    ({"match": {"epcohs": 1}}, "epcohs"),
    ({"hss": {"leef": 3}}, "leef"),
    ({"rank": "64"}, "rank"),
    ({"rank": 8, "rho": 0.5}, "either rank or rho"),
    ({"kappa": 0.3}, "needs rho"),
    ({"iterations": 0}, "iterations"),
    ({"nsamples": 0}, "nsamples"),
    ({"activation_dtype": "float64"}, "activation_dtype"),
    ({"dense": "yes"}, "dense"),
    ({"layer_target": "dense"}, "layer_target"),
    ({"skip": "o_proj"}, "skip"),
    ({"engine": {"percdamp": "0.1"}}, "percdamp"),
    ({"match": {"epochs": 1}, "dense": True}, "dense"),
    ([1, 2], "mapping"),
])
def test_reading_is_strict(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_rank_policies_map_both_ways():
    assert Recipe.from_settings({"rank": RankPolicy.fixed(12)}).rank_policy() == 12
    assert Recipe.from_settings({"rank": RankPolicy.compression(0.4)}).rank_policy() == RankPolicy.compression(0.4)
    policy = RankPolicy.rank_ratio(0.3, 0.5)
    assert Recipe.from_settings({"rank": policy, "pattern": "unstructured:0.5"}).rank_policy() == policy


def test_keyword_form_is_the_same_run_and_the_report_records_it():
    ids = token_batch(2, 32)
    settings = dict(pattern="2:4", rank=4, method="hassle-free-exact", iterations=2, percdamp=0.02,
                    match={"epochs": 1, "lr": 1e-3}, activation_dtype=torch.float32)
    a, b = tiny_llama(), tiny_llama()
    report = compress(a, calibration=ids, progress=False, **settings)
    recipe = Recipe.from_settings(settings)
    again = compress(b, None, recipe, calibration=ids, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert report.recipe == recipe.to_dict() == again.recipe
    assert report.recipe["engine"] == {"percdamp": 0.02} and report.recipe["match"]["epochs"] == 1
    with pytest.raises(ValueError, match="either a recipe or the keyword settings"):
        compress(tiny_llama(), None, recipe, calibration=ids, rank=4, progress=False)


def test_recipe_file_paths_stay_in_their_folder(tmp_path):
    (tmp_path / "calib.txt").write_text("some text")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"calib": "calib.txt"}))
    assert Recipe.from_json_file(good).calib == str((tmp_path / "calib.txt").resolve())
    assert Recipe.from_json_file(good, calib="/my/own.txt").calib == "/my/own.txt"
    for calib in ("../outside.txt", "sub/../../outside.txt", "/etc/passwd"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"calib": calib}))
        with pytest.raises(ValueError, match="calibration file"):
            Recipe.from_json_file(bad)
    assert Recipe.from_json_file(_write(tmp_path / "name.json", {"calib": "c4"})).calib == "c4"
    with pytest.raises(ValueError, match="cannot read the recipe"):
        Recipe.from_json_file(_write(tmp_path / "broken.json", None, text="{not json"))


def _write(path, data, text=None):
    path.write_text(text if text is not None else json.dumps(data))
    return path


def test_cli_recipe_repeats_a_run_bit_for_bit(tmp_path, capsys):
    text = stories_text()
    first = tmp_path / "first"
    assert main(["compress", "stories260K", "--out", str(first), "--calib", text, "--nsamples", "4",
                 "--seqlen", "64", "--rank", "4", "--method", "hassle-free-exact", "--iterations", "2",
                 "--percdamp", "0.02", "--quiet"]) == 0
    recorded = json.loads((first / "report.json").read_text())["recipe"]
    assert recorded["rank"] == 4 and recorded["engine"] == {"percdamp": 0.02} and recorded["seqlen"] == 64
    second = tmp_path / "second"
    capsys.readouterr()
    assert main(["compress", "stories260K", "--out", str(second), "--recipe", str(first / "report.json"),
                 "--quiet"]) == 2  # the report names a calibration file outside its folder
    assert "outside the recipe's folder" in capsys.readouterr().err
    assert main(["compress", "stories260K", "--out", str(second), "--recipe", str(first / "report.json"),
                 "--calib", text, "--quiet"]) == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["compress", "stories260K", "--out", str(tmp_path / "third"), "--recipe",
                 str(first / "report.json"), "--rank", "8"]) == 2
    assert "drop --rank" in capsys.readouterr().err


def test_report_says_how_bf16_products_ran(monkeypatch: pytest.MonkeyPatch):
    """A bf16 CPU run records whether its block forwards used the float32 products; other runs
    record nothing."""
    from hasslefree import cpu_bf16

    ids = token_batch(2, 32)
    settings = dict(pattern="2:4", rank=0, method="magnitude", progress=False)
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: False)
    monkeypatch.delenv(cpu_bf16.NATIVE_ENV, raising=False)
    assert compress(tiny_llama().to(torch.bfloat16), calibration=ids, activation_dtype=torch.bfloat16,
                    **settings).bf16_products == "float32"
    monkeypatch.setenv(cpu_bf16.NATIVE_ENV, "1")
    report = compress(tiny_llama().to(torch.bfloat16), calibration=ids, activation_dtype=torch.bfloat16, **settings)
    assert report.bf16_products == "native" and report.to_json()["bf16_products"] == "native"
    assert compress(tiny_llama(), calibration=ids, activation_dtype=torch.float32, **settings).bf16_products is None
