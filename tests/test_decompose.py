import pytest
import torch

import hasslefree as hf
from hasslefree.rank_policy import RankPolicy

from helpers import correlated_problem


def test_result_shapes_pattern_and_counts():
    weight, hessian = correlated_problem(20, 24, seed=0, dtype=torch.float32)
    result = hf.decompose_layer(weight, hessian, pattern="2:4", rank=3, method="hassle-free-exact",
                                iterations=4, seed=0)
    assert result.sparse.shape == (20, 24) and result.U.shape == (20, 3) and result.V.shape == (24, 3)
    assert (result.sparse.reshape(20, 6, 4) != 0).sum(-1).max() <= 2
    assert result.rank == 3 and result.iterations == 4 and len(result.history) == 4
    assert result.seconds > 0
    assert result.parameter_count == 20 * 12 + 3 * (20 + 24)
    assert 0 < result.relative_objective(hessian) < 1
    assert hf.layer_objective(weight, result.to_dense(), hessian) == pytest.approx(result.objective(hessian))


def test_dead_inputs_are_zeroed_and_ignored():
    weight, hessian = correlated_problem(8, 16, seed=1)
    hessian[3, :] = 0
    hessian[:, 3] = 0
    result = hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free-exact", iterations=3)
    assert torch.isfinite(result.to_dense()).all()
    assert torch.all(result.sparse[:, 3] == 0)


def test_rank_policies_follow_the_guide_formulas():
    pattern = hf.SparsityPattern.parse("2:8")
    rank, _ = RankPolicy.compression(0.5).resolve(pattern, 576, 1536)
    assert rank == int((1 - 0.5 - 0.25) * 576 * 1536 / (576 + 1536))
    rank, unstructured = RankPolicy.rank_ratio(0.3, 0.5).resolve(hf.SparsityPattern.parse("unstructured:0.5"), 100, 60)
    assert rank == int(0.3 * 0.5 * 6000 / 160)
    assert unstructured.nonzeros == int(0.7 * 0.5 * 6000)
    total = hf.parameter_count(unstructured, rank, 100, 60)
    assert total <= 0.5 * 6000


BAD = [
    (dict(pattern="2:4"), (8, 10), "not divisible by M=4"),
    (dict(pattern="4:4"), (8, 8), "N must be smaller than M"),
    (dict(rank=9), (8, 12), "exceeds min"),
    (dict(method="nope"), (8, 8), "unknown method"),
    (dict(method="sparsegpt", rank=4), (8, 8), "prunes only"),
]


@pytest.mark.parametrize("kwargs,shape,message", BAD)
def test_bad_arguments_raise_before_work(kwargs, shape, message):
    weight = torch.randn(*shape)
    hessian = torch.eye(shape[1])
    args = dict(pattern="2:4", rank=2, method="hassle-free") | kwargs
    with pytest.raises(ValueError, match=message):
        hf.decompose_layer(weight, hessian, **args)


def test_bad_tensors_raise():
    weight = torch.randn(8, 8)
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        hf.decompose_layer(bad, torch.eye(8), "2:4", 2)
    h = torch.eye(8)
    h[1, 1] = float("inf")
    with pytest.raises(ValueError, match="Hessian contains NaN or Inf"):
        hf.decompose_layer(weight, h, "2:4", 2)
    with pytest.raises(ValueError, match="square"):
        hf.decompose_layer(weight, torch.ones(8, 4), "2:4", 2)
    with pytest.raises(ValueError, match="expected 8x8"):
        hf.decompose_layer(weight, torch.eye(6), "2:4", 2)


def test_group_shares_one_hessian_and_matches_separate_calls():
    weight, hessian = correlated_problem(12, 16, seed=3)
    other = torch.randn(6, 16, dtype=torch.float64)
    group = hf.decompose_group({"q": weight, "k": other}, hessian, pattern="2:4", rank=2,
                               method="hassle-free-exact", iterations=3, dtype=torch.float64)
    alone = hf.decompose_layer(other, hessian, "2:4", 2, "hassle-free-exact", iterations=3, dtype=torch.float64)
    torch.testing.assert_close(group["k"].to_dense(), alone.to_dense())
    with pytest.raises(ValueError, match="bad: Hessian is 16x16 but the weight has 10 inputs"):
        hf.decompose_group({"ok": weight, "bad": torch.randn(4, 10)}, hessian, pattern="2:4", rank=2)


@pytest.mark.parametrize("method,pattern", [("hassle-free-exact", "2:4"), ("hassle-free", "3:8"),
                                            ("oats", "row:0.5"), ("sparsegpt", "2:4")])
def test_stacked_group_gives_the_same_masks_and_factors_as_separate_solves(method, pattern):
    weight, hessian = correlated_problem(24, 32, seed=4)
    gen = torch.Generator().manual_seed(9)
    weights = {"q": weight, "k": torch.randn(8, 32, generator=gen, dtype=torch.float64),
               "v": torch.randn(8, 32, generator=gen, dtype=torch.float64)}
    rank = 0 if hf.PRESETS[method].prunes_only else 3
    kwargs = dict(pattern=pattern, rank=rank, method=method, iterations=6, dtype=torch.float64)
    stacked = hf.decompose_group(weights, hessian, stack=True, **kwargs)
    for name, w in weights.items():
        alone = hf.decompose_layer(w, hessian, **kwargs)
        assert torch.equal(stacked[name].sparse != 0, alone.sparse != 0)
        torch.testing.assert_close(stacked[name].sparse, alone.sparse, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(stacked[name].U @ stacked[name].V.T, alone.U @ alone.V.T, rtol=1e-8, atol=1e-9)
        assert stacked[name].history == pytest.approx(alone.history, rel=1e-9)


def test_clock_splits_the_time_between_the_steps():
    weight, hessian = correlated_problem(24, 32, seed=2)
    clock: dict[str, float] = {}
    result = hf.decompose_layer(weight, hessian, "2:4", 3, "hassle-free-fast", iterations=3, clock=clock)
    assert set(clock) == {"prepare", "P1", "P2", "objective"}
    assert all(v > 0 for v in clock.values()) and sum(clock.values()) <= result.seconds * 1.01
    group_clock: dict[str, float] = {}
    hf.decompose_group({"a": weight, "b": weight[:8]}, hessian, rank=0, method="sparsegpt", clock=group_clock)
    assert set(group_clock) == {"prepare", "P1"}


def test_loop_options_override_the_preset_and_are_checked_first():
    weight, hessian = correlated_problem(24, 32, seed=3)
    base = hf.decompose_layer(weight, hessian, "2:4", 4, "hassle-free-exact", iterations=6, start="sparse")
    refined = hf.decompose_layer(weight, hessian, "2:4", 4, "hassle-free-exact", iterations=6, start="sparse",
                                 loop_options={"refresh_every": 3, "refine_iterations": 4})
    assert base.history[0] == refined.history[0]  # iteration 1 prunes in both
    assert refined.history[1] != base.history[1]  # iteration 2 refits the support instead
    with pytest.raises(ValueError, match="unknown loop option 'refresh'"):
        hf.decompose_layer(weight, hessian, "2:4", 4, "hassle-free-fast", loop_options={"refresh": 2})
    with pytest.raises(ValueError, match="refine_iterations must be an integer >= 1"):
        hf.decompose_group({"a": weight}, hessian, rank=4, method="hassle-free-fast",
                           loop_options={"refine_iterations": 0})


@pytest.mark.parametrize("percdamp, coordinate_damp", [(0.01, 0.0), (0.005, 0.005), (0.0, 0.0)])
def test_the_result_reports_its_objective_under_the_damped_hessian_too(percdamp, coordinate_damp):
    """Solvers minimise H + λI (+ c·diag H); the report scores both that and the plain H."""
    weight, hessian = correlated_problem(24, 32, seed=5)
    result = hf.decompose_layer(weight, hessian, "2:4", 3, "hassle-free-exact", iterations=3,
                                percdamp=percdamp, coordinate_damp=coordinate_damp, dtype=torch.float64)
    damped = hessian.clone()
    damped.diagonal().add_(percdamp * float(hessian.diagonal().mean()) + coordinate_damp * hessian.diagonal())
    assert result.damped_relative_objective == pytest.approx(result.relative_objective(damped), rel=1e-9)
    if percdamp == coordinate_damp == 0:
        assert result.damped_relative_objective == pytest.approx(result.relative_objective(hessian), rel=1e-9)
    else:
        assert result.damped_relative_objective != pytest.approx(result.relative_objective(hessian), rel=1e-6)


@pytest.mark.parametrize("bad", [dict(percdamp=-0.1), dict(percdamp=float("nan")), dict(coordinate_damp=-1.0),
                                 dict(tolerance=-1e-3), dict(tolerance=float("inf")), dict(patience=0)])
def test_damping_and_early_stop_values_are_checked_before_work(bad):
    weight, hessian = correlated_problem(8, 16, seed=2)
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free-exact", iterations=2, **bad)
    with pytest.raises(ValueError, match=key):
        hf.decompose_group({"a": weight}, hessian, pattern="2:4", rank=2, method="hassle-free-exact", **bad)
    from hasslefree.pipeline import prepare
    from helpers import tiny_llama

    with pytest.raises(ValueError, match=key):
        prepare(tiny_llama(), pattern="2:4", rank=4, method="hassle-free-fast", engine_options=bad)


def test_a_misspelt_solver_option_is_an_error_before_work():
    """The solvers ignore the loop's common keywords, so option names are checked up front."""
    weight, hessian = correlated_problem(8, 16, seed=3)
    with pytest.raises(ValueError, match="'blocksiz'.*sparsegpt_prune"):
        hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free-exact", sparse_options={"blocksiz": 64})
    with pytest.raises(ValueError, match="'power_iteration'"):
        hf.decompose_group({"a": weight}, hessian, pattern="2:4", rank=2, method="hassle-free-fast",
                           lowrank_options={"power_iteration": 2})
    with pytest.raises(ValueError, match="'warm'"):  # supplied by the loop, not a user option
        hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free-exact", lowrank_options={"warm": None})
    result = hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free-exact", iterations=2,
                                sparse_options={"blocksize": 8}, lowrank_options={"randomized": True})
    assert result.iterations == 2
    from hasslefree.pipeline import prepare
    from helpers import tiny_llama

    with pytest.raises(ValueError, match="'stepz'"):
        prepare(tiny_llama(), pattern="2:4", rank=4, method="hassle-free",
                engine_options={"lowrank_options": {"stepz": 3}})
