"""Random valid and invalid arguments for ``hasslefree compress`` and ``decompose_layer``.

Each example takes every option from a pool of values that are valid together, then maybe
swaps ONE option for an invalid value. Valid examples must get as far as the work (the model
loader, the Hessian preparation); invalid ones must stop before it, with exit code 2 and one
``error:`` line (CLI) or a ValueError naming the problem (API). Nothing may end in a traceback.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hasslefree
from hasslefree import cli, decompose

torch.set_num_threads(1)

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class ReachedTheWork(Exception):
    """Raised by the patched loader / Hessian preparation: every check before it passed."""


# ----------------------------------------------------------------- hasslefree compress
CLI_VALID = {
    "--pattern": st.sampled_from(["2:4", "4:8", "1:4"]),
    "--method": st.sampled_from(["hassle-free", "hassle-free-fast", "hassle-free-exact", "oats"]),
    "--iterations": st.integers(1, 40).map(str),
    "--nsamples": st.integers(1, 64).map(str),
    "--seqlen": st.integers(16, 256).map(str),
    "--batch-size": st.integers(1, 4).map(str),
    "--percdamp": st.floats(0, 0.1).map(repr),
    "--coordinate-damp": st.floats(0, 0.01).map(repr),
    "--tolerance": st.floats(0, 0.01).map(repr),
    "--match-epochs": st.integers(0, 2).map(str),
    "--match-lr": st.floats(1e-5, 1e-2).map(repr),
    "--match-target": st.sampled_from(["block", "model"]),
    "--dtype": st.sampled_from(["float32", "bfloat16"]),
    "--device": st.just("cpu"),
    "--override": st.sampled_from(["mlp.down_proj=rank:32", "o_proj=pattern:4:8", "q_proj=iterations:3"]),
    "--skip": st.just("o_proj"),
}
BUDGET_VALID = {"--rank": st.integers(0, 128).map(str), "--rho": st.floats(0.2, 0.8).map(repr)}
CLI_INVALID = {
    "--pattern": ["5:4", "abc", "unstructured:1.5", "2:2", ""],
    "--rank": ["-1", "x", "1.5"],
    "--rho": ["1.5", "0", "nan", "-0.2"],
    "--method": ["hassle-fre", ""],
    "--iterations": ["0", "-2", "three"],
    "--nsamples": ["0", "-5"],
    "--seqlen": ["0", "-1"],
    "--batch-size": ["0"],
    "--percdamp": ["-0.1", "nan", "inf"],
    "--coordinate-damp": ["-1", "nan"],
    "--tolerance": ["-0.5", "inf"],
    "--match-epochs": ["-1", "1.5"],
    "--match-lr": ["0", "nan", "-1e-3"],
    "--match-target": ["layer"],
    "--dtype": ["float64"],
    "--device": ["tpu", "cuda:x"],
    "--override": ["mlp.down_proj=rnak:32", "([=rank:3", "mlp=rank:-3", "mlp.down_proj"],
    "--calib": ["/nonexistent/calibration.txt"],
}


@st.composite
def compress_argv(draw) -> tuple[list[str], str | None]:
    """(argv after the model and --out, the option made invalid or None)."""
    names = draw(st.lists(st.sampled_from(sorted(CLI_VALID)), unique=True, max_size=8))
    options = {name: draw(CLI_VALID[name]) for name in names}
    budget = draw(st.sampled_from([None, "--rank", "--rho"]))
    if budget:
        options[budget] = draw(BUDGET_VALID[budget])
    bad = draw(st.sampled_from([None, None, *sorted(CLI_INVALID)]))
    if bad is not None:
        if bad in BUDGET_VALID:  # --rank and --rho exclude each other: replace the one given
            options.pop("--rank", None)
            options.pop("--rho", None)
        options[bad] = draw(st.sampled_from(CLI_INVALID[bad]))
    argv = [f"{name}={value}" for name, value in options.items()]  # "=" keeps "-1" a value
    return argv, bad


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "text.txt"
    path.write_text("Once upon a time there was a little model that was compressed. " * 50)
    return str(path)


@FUZZ
@given(case=compress_argv())
def test_compress_options_fail_before_loading_or_reach_it(case, calibration_file, capsys, tmp_path):
    argv, bad = case
    if not any(a.startswith("--calib=") for a in argv):
        argv = [*argv, f"--calib={calibration_file}"]
    command = ["compress", "stories260K", "--out", str(tmp_path / "out"), "--quiet", *argv]
    capsys.readouterr()
    with mock.patch.object(cli, "_load_for_compress", side_effect=ReachedTheWork):
        try:
            code = cli.main(command)
        except ReachedTheWork:
            assert bad is None, f"{bad} with an invalid value got past the checks: {command}"
            return
        except SystemExit as exc:  # argparse: usage line + one error line
            code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert bad is not None, f"valid options were refused: {command}: {err}"
    assert code == 2, (command, err)
    assert err and "error:" in err[-1] and "Traceback" not in "\n".join(err), (command, err)


# ----------------------------------------------------------------- decompose_layer
OUT, IN = 8, 16
API_VALID = {
    "pattern": st.sampled_from(["2:4", "1:4", "4:8", "unstructured:0.5"]),
    "rank": st.integers(0, 4),
    "method": st.sampled_from(["hassle-free", "hassle-free-fast", "hassle-free-exact", "oats", "hassle-free-alps"]),
    "iterations": st.integers(1, 3),
    "seed": st.integers(0, 2**31 - 1),
    "percdamp": st.floats(0.001, 0.1),
    "coordinate_damp": st.floats(0, 0.01),
    "tolerance": st.floats(0, 0.01),
    "patience": st.integers(1, 5),
    "start": st.sampled_from(["sparse", "lowrank", "auto"]),
    "sparse_solver": st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
    "loop_options": st.sampled_from([{"refresh_every": 2}, {"refine_iterations": 3}]),
}
API_INVALID = {
    "pattern": ["5:4", "x", "unstructured:2", 24],
    "rank": [-1, "3", 1.5, 99],
    "method": ["hassle-fre", None],
    "iterations": [0, -2, "3", 1.5],
    "percdamp": [-0.1, math.nan, math.inf, "0.01"],
    "coordinate_damp": [-1.0, math.nan],
    "tolerance": [-0.5, math.inf],
    "patience": [0, 2.5],
    "start": ["middle", 1],
    "sparse_solver": ["sparsegtp"],
    "lowrank_solver": ["svdd"],
    "sparse_options": [{"blocksiz": 3}],
    "lowrank_options": [{"stepz": 3}],
    "loop_options": [{"refresh": 2}, {"refresh_every": 0}],
    "weight": [torch.ones(OUT), torch.full((OUT, IN), math.nan)],
    "hessian": [torch.eye(IN + 1), torch.ones(IN)],
}


@st.composite
def decompose_case(draw) -> tuple[dict, str | None]:
    names = draw(st.lists(st.sampled_from(sorted(API_VALID)), unique=True, max_size=7))
    kwargs = {name: draw(API_VALID[name]) for name in names}
    kwargs.setdefault("rank", draw(API_VALID["rank"]))  # the default (64) exceeds this small layer
    bad = draw(st.sampled_from([None, None, *sorted(API_INVALID)]))
    if bad is not None:
        kwargs[bad] = draw(st.sampled_from(API_INVALID[bad]))
    return kwargs, bad


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, IN, generator=g)
    return torch.randn(OUT, IN, generator=g), x.T @ x / 64


@FUZZ
@given(case=decompose_case())
def test_decompose_layer_arguments_fail_before_work_or_run(case):
    kwargs, bad = case
    weight, hessian = _problem()
    weight, hessian = kwargs.pop("weight", weight), kwargs.pop("hessian", hessian)
    if bad is None:
        result = hasslefree.decompose_layer(weight, hessian, **kwargs)
        assert result.sparse.shape == weight.shape and torch.isfinite(result.to_dense()).all()
        return
    with mock.patch.object(decompose, "prepare_hessian", side_effect=ReachedTheWork):
        with pytest.raises(ValueError) as caught:
            hasslefree.decompose_layer(weight, hessian, **kwargs)
    assert "\n" not in str(caught.value).strip()


def test_a_misspelt_keyword_is_named():
    weight, hessian = _problem()
    with pytest.raises(TypeError, match="rnak"):
        hasslefree.decompose_layer(weight, hessian, "2:4", 8, "hassle-free", rnak=3)
