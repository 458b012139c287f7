import pytest
import torch

import hasslefree as hf
from hasslefree.alternating import alternate_many
from hasslefree.hessian import prepare_hessian
from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.patterns import SparsityPattern
from hasslefree.sparse import SPARSE_SOLVERS

from helpers import correlated_problem


def _oats_reference(weight, diag_h, rank, n, m, iterations):
    """OATS as published: scale columns by sqrt(diag H); from S = 0 alternate a truncated
    SVD of (DW − S) and N:M hard thresholding of (DW − L); unscale at the end."""
    d = diag_h.sqrt()
    scaled = weight * d
    sparse = torch.zeros_like(scaled)
    for _ in range(iterations):
        u, s, vt = torch.linalg.svd(scaled - sparse, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vt[:rank]
        resid = scaled - low
        groups = resid.abs().reshape(resid.shape[0], -1, m)
        drop = groups.topk(m - n, dim=2, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False).reshape(resid.shape)
        sparse = resid * mask
    return (low + sparse) / d


def test_oats_preset_equals_the_published_update_on_a_diagonal_hessian():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=gen, dtype=torch.float64)
    diag_h = torch.rand(32, generator=gen, dtype=torch.float64) * 3 + 0.1
    result = hf.decompose_layer(weight, torch.diag(diag_h), "2:4", 5, "oats", iterations=15,
                                dtype=torch.float64)
    expected = _oats_reference(weight, diag_h, 5, 2, 4, 15)
    torch.testing.assert_close(result.to_dense(), expected, rtol=1e-9, atol=1e-9)
    assert result.best_iteration == 15  # exact alternating minimisation never goes up


@pytest.mark.parametrize("start", ["sparse", "lowrank"])
def test_magnitude_svd_with_identity_hessian_never_increases(start):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    result = hf.decompose_layer(weight, torch.eye(40, dtype=torch.float64), "2:4", 6, "magnitude-svd",
                                iterations=25, start=start, percdamp=0.0, dtype=torch.float64)
    history = torch.tensor(result.history)
    assert (history[1:] <= history[:-1] * (1 + 1e-12)).all()
    assert history[-1] < history[0]


@pytest.mark.parametrize("method", ["hassle-free", "hassle-free-exact", "oats", "hassle-free-alps"])
def test_best_iterate_is_no_worse_than_any_iterate(method):
    weight, hessian = correlated_problem(20, 32, seed=2)
    result = hf.decompose_layer(weight, hessian, "2:4", 4, method, iterations=12, dtype=torch.float64)
    assert result.objective(hessian) == pytest.approx(min(result.history), rel=1e-9)
    assert all(result.objective(hessian) <= value * (1 + 1e-12) for value in result.history)
    assert result.history[result.best_iteration - 1] == min(result.history)


def test_hassle_free_beats_oats_and_sparsegpt_on_correlated_inputs():
    weight, hessian = correlated_problem(48, 64, tokens=600, seed=3)
    f = {m: hf.decompose_layer(weight, hessian, "2:4", 0 if hf.PRESETS[m].prunes_only else 8, m,
                               iterations=30, dtype=torch.float64).relative_objective(hessian)
         for m in ["sparsegpt", "oats", "hassle-free", "hassle-free-exact"]}
    assert f["hassle-free-exact"] < f["oats"]
    assert f["hassle-free-exact"] < f["sparsegpt"]
    assert f["hassle-free"] < f["sparsegpt"]


def test_early_stop_reports_iterations_used():
    weight, hessian = correlated_problem(20, 32, seed=4)
    result = hf.decompose_layer(weight, hessian, "2:4", 4, "hassle-free-exact", iterations=200,
                                tolerance=1e-3, patience=3)
    assert 3 < result.iterations < 200


def test_seed_makes_runs_reproducible():
    weight, hessian = correlated_problem(10, 16, seed=5)
    a = hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free", iterations=3, seed=7)
    b = hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free", iterations=3, seed=7)
    c = hf.decompose_layer(weight, hessian, "2:4", 2, "hassle-free", iterations=3, seed=8)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert not torch.equal(a.to_dense(), c.to_dense())


def test_full_rank_and_dense_pattern_is_lossless():
    weight, hessian = correlated_problem(8, 12, seed=6)
    result = hf.decompose_layer(weight, hessian, "dense", 0, "sparsegpt", dtype=torch.float64)
    torch.testing.assert_close(result.to_dense(), weight)


def test_exact_preset_does_not_stall_when_low_rank_carries_the_layer():
    """W ≈ rank-16 + noise at rank 16 (like SmolLM2's k_proj at rank 64): pruning W first lets
    the sparse part absorb the layer and the alternation stalls far above OATS; the preset
    fits the low-rank part first and must end no worse than OATS."""
    _, hessian = correlated_problem(48, 96, tokens=500, seed=1)
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(48, 16, generator=gen, dtype=torch.float64)
              @ torch.randn(16, 96, generator=gen, dtype=torch.float64)
              + 0.05 * torch.randn(48, 96, generator=gen, dtype=torch.float64))

    def run(method, **kw):
        return hf.decompose_layer(weight, hessian, "2:4", 16, method, iterations=40,
                                  dtype=torch.float64, **kw).relative_objective(hessian)

    oats = run("oats")
    assert run("hassle-free-exact", start="sparse") > 100 * oats  # the stall is real
    assert run("hassle-free-exact") <= oats


def test_fast_preset_tracks_the_exact_preset():
    weight, hessian = correlated_problem(40, 64, seed=8)
    fast = hf.decompose_layer(weight, hessian, "2:4", 6, "hassle-free-fast", iterations=40)
    exact = hf.decompose_layer(weight, hessian, "2:4", 6, "hassle-free-exact", iterations=40)
    assert fast.relative_objective(hessian) <= exact.relative_objective(hessian) * 1.05


def test_early_stop_trades_iterations_for_objective():
    """Improvement comes in steps (the support changes now and then): a short patience stops
    on a plateau. The iterations it saves and the objective it costs are both reported."""
    weight, hessian = correlated_problem(40, 64, seed=8)
    early = hf.decompose_layer(weight, hessian, "2:4", 6, "hassle-free-exact", iterations=200,
                               tolerance=1e-3, patience=5)
    full = hf.decompose_layer(weight, hessian, "2:4", 6, "hassle-free-exact", iterations=200)
    assert early.iterations < full.iterations == 200
    assert early.history == full.history[: early.iterations]


def test_support_refits_between_pruning_passes_keep_the_pattern_and_help():
    """refresh_every=k: P1 prunes on iterations 1, k+1, ...; in between it keeps the support and
    re-solves S jointly with U. The pattern holds, and on a coupled problem it ends lower."""
    weight, hessian = correlated_problem(40, 64, seed=8)
    common = dict(iterations=20, start="sparse", sparse_solver="sparsegpt", lowrank_solver="exact")
    every = hf.decompose_layer(weight, hessian, "2:4", 6, "hassle-free-exact", **common)
    pattern = SparsityPattern.parse("2:4")
    prepared = prepare_hessian(hessian)
    [refined] = alternate_many([weight.float()], prepared, pattern, [6], prune=SPARSE_SOLVERS["sparsegpt"],
                               lowrank=LOWRANK_SOLVERS["exact"], iterations=20, refresh_every=5)
    groups = (refined.sparse != 0).reshape(40, -1, 4).sum(-1)
    assert bool((groups <= 2).all())
    assert min(refined.history) < min(every.history)
    with pytest.raises(ValueError, match="refresh_every"):
        alternate_many([weight.float()], prepared, pattern, [6], prune=SPARSE_SOLVERS["sparsegpt"],
                       lowrank=LOWRANK_SOLVERS["exact"], iterations=2, refresh_every=0)


@pytest.mark.parametrize("start", ["sparse", "lowrank"])
def test_support_refits_pair_the_refitted_sparse_part_with_its_optimal_U(start):
    """On refit iterations the recorded iterate must be the one the refit optimised: S on the
    support and U jointly optimal for the current V. Sparse-first gets U from the P2 that
    follows; low-rank-first has no P2 after the refit, so U is re-solved for V. Checked by the
    stationarity of U, (W − S − U Vᵀ) H V = 0 (H the solvers' damped Hessian), on every
    refit iteration, and against the objective with a float64 least-squares U."""
    weight, hessian = correlated_problem(96, 128, seed=3)
    prepared = prepare_hessian(hessian)
    pattern = SparsityPattern.parse("2:4")
    snapshots = []
    for iterations in range(2, 6):  # iterations 2..5 are refits (refresh_every=5)
        [result] = alternate_many([weight], prepared, pattern, [16], prune=SPARSE_SOLVERS["sparsegpt"],
                                  lowrank=LOWRANK_SOLVERS["exact"], iterations=iterations, start=start,
                                  refresh_every=5, refine_iterations=30)
        snapshots.append(result)
    h = prepared.damped
    for result in snapshots:
        assert result.best_iteration > 1  # a refit iterate was kept
        residual = weight - result.sparse - result.U @ result.V.mT
        gradient = residual @ h @ result.V
        scale = (weight - result.sparse) @ h @ result.V
        assert float(gradient.norm() / scale.norm()) < 1e-8
        # the least-squares U in float64 for the same S, V gives the recorded objective
        hv = h @ result.V
        best_u = torch.linalg.solve(result.V.mT @ hv, ((weight - result.sparse) @ hv).mT).mT
        best = weight - result.sparse - best_u @ result.V.mT
        undamped = float(((best @ prepared.raw) * best).sum())
        assert min(result.history) == pytest.approx(undamped, rel=1e-6)
