import itertools

import pytest
import torch

from hasslefree.hessian import prepare_hessian
from hasslefree.objective import residual_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.sparse import SPARSE_SOLVERS, magnitude_prune, sparsegpt_prune, wanda_prune
from hasslefree.sparse.refit import refit_on_support

from helpers import correlated_problem

PATTERNS = ["2:4", "1:4", "3:8", "4:8", "2:8", "unstructured:0.35", "row:0.4"]


@pytest.mark.parametrize("solver", sorted(SPARSE_SOLVERS))
@pytest.mark.parametrize("spec", PATTERNS)
def test_every_solver_obeys_the_pattern(solver, spec):
    weight, hessian = correlated_problem(13, 40, seed=3)
    pattern = SparsityPattern.parse(spec)
    sparse = SPARSE_SOLVERS[solver](weight, prepare_hessian(hessian), pattern)
    assert pattern.is_satisfied_by(sparse != 0)
    assert bool(torch.isfinite(sparse).all())


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(19, 72, generator=gen, dtype=torch.float64)
    identity = prepare_hessian(torch.eye(72, dtype=torch.float64), percdamp=0.0)
    for spec in ["2:4", "3:8", "1:3"]:
        pattern = SparsityPattern.parse(spec)
        w = weight[:, : (72 // pattern.m) * pattern.m]
        ident = prepare_hessian(torch.eye(w.shape[1], dtype=torch.float64), percdamp=0.0)
        torch.testing.assert_close(sparsegpt_prune(w, ident, pattern), magnitude_prune(w, None, pattern))
    for spec in ["unstructured:0.3", "row:0.5"]:
        pattern = SparsityPattern.parse(spec)
        torch.testing.assert_close(sparsegpt_prune(weight, identity, pattern, adaptive_mask=False),
                                   magnitude_prune(weight, None, pattern))


def test_sparsegpt_block_size_does_not_change_the_result():
    weight, hessian = correlated_problem(11, 64, seed=7)
    prepared = prepare_hessian(hessian)
    pattern = SparsityPattern.parse("2:4")
    reference = sparsegpt_prune(weight, prepared, pattern, blocksize=64)
    for blocksize in [4, 12, 128]:
        torch.testing.assert_close(sparsegpt_prune(weight, prepared, pattern, blocksize=blocksize), reference)


def test_sparsegpt_matches_unblocked_obs_reference():
    """Reference: prune one column at a time, updating all later columns with the
    explicit inverse-Hessian recursion (no Cholesky, no blocks)."""
    weight, hessian = correlated_problem(9, 24, seed=11)
    prepared = prepare_hessian(hessian)
    pattern = SparsityPattern.parse("2:4")
    w = weight.clone()
    hinv = torch.linalg.inv(prepared.damped)
    for j in range(24):
        if j % 4 == 0:
            # Saliency uses H⁻¹ of the columns not yet eliminated: inv(H[k:, k:])[0, 0].
            d = torch.stack([torch.linalg.inv(prepared.damped[k:, k:])[0, 0] for k in range(j, j + 4)])
            scores = w[:, j:j + 4] ** 2 / d  # OBS saliency w² / [H⁻¹]_kk
            keep = pattern.mask_from_scores(scores)
        pruned = ~keep[:, j % 4]
        err = w[:, j] * pruned / hinv[j, j]
        w -= err.unsqueeze(1) * hinv[j].unsqueeze(0)
        w[:, j] = w[:, j] * ~pruned
        # Remove coordinate j from the inverse Hessian (Gaussian elimination on H⁻¹).
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    torch.testing.assert_close(sparsegpt_prune(weight, prepared, pattern), w)


def test_wanda_is_the_exact_optimum_for_a_diagonal_hessian():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    diag = torch.diag(torch.rand(8, generator=gen, dtype=torch.float64) * 5 + 0.1)
    prepared = prepare_hessian(diag)
    pattern = SparsityPattern.parse("2:4")
    ours = residual_objective(weight - wanda_prune(weight, prepared, pattern), diag)
    best = 0.0
    groups = list(itertools.combinations(range(4), 2))
    for row in weight:
        row_best = float("inf")
        for a, b in itertools.product(groups, groups):
            keep = torch.zeros(8, dtype=torch.bool)
            keep[list(a)] = True
            keep[[4 + i for i in b]] = True
            # With diagonal H the optimal values on a support are the weights themselves.
            err = row * ~keep
            row_best = min(row_best, float(err @ diag @ err))
        best += row_best
    assert ours == pytest.approx(best, rel=1e-12)


def test_full_hessian_solvers_beat_diagonal_ones_on_correlated_inputs():
    weight, hessian = correlated_problem(40, 64, seed=4)
    prepared = prepare_hessian(hessian)
    pattern = SparsityPattern.parse("2:4")
    f = {name: residual_objective(weight - solver(weight, prepared, pattern), hessian)
         for name, solver in SPARSE_SOLVERS.items()}
    assert f["sparsegpt"] < f["wanda"] and f["sparsegpt"] < f["magnitude"]
    assert f["alps"] < f["sparsegpt"]


def test_refit_matches_per_row_direct_solve():
    weight, hessian = correlated_problem(6, 20, seed=9)
    mask = SparsityPattern.parse("row:0.5").mask_from_scores(torch.rand(6, 20, dtype=torch.float64))
    fitted = refit_on_support(weight, hessian, mask, iterations=200, tolerance=1e-28)
    for r in range(6):
        s = mask[r]
        expected = torch.zeros(20, dtype=torch.float64)
        expected[s] = torch.linalg.solve(hessian[s][:, s], (hessian @ weight[r])[s])
        torch.testing.assert_close(fitted[r], expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("spec", ["2:4", "2:8", "unstructured:0.4"])
def test_sparsegpt_refit_keeps_the_mask_and_reaches_the_support_optimum(spec):
    weight, hessian = correlated_problem(21, 56, seed=8)
    weight[:, 5] = 0.7  # a weight on an input the calibration never saw must stay pruned
    hessian[5, :] = 0
    hessian[:, 5] = 0
    prepared = prepare_hessian(hessian)
    pattern = SparsityPattern.parse(spec)
    plain = sparsegpt_prune(weight, prepared, pattern)
    short = sparsegpt_prune(weight, prepared, pattern, refit_iterations=3)
    full = sparsegpt_prune(weight, prepared, pattern, refit_iterations=300)
    mask = plain != 0
    assert torch.equal(short != 0, mask) and torch.equal(full != 0, mask)
    assert not bool(full[:, 5].any())
    goal = weight.clone()
    goal[:, prepared.dead] = 0
    # per-row least squares on the support, in float64, with the damped H the solver uses
    h = prepared.damped.double()
    expected = torch.zeros_like(goal, dtype=torch.float64)
    for row in range(goal.shape[0]):
        cols = mask[row].nonzero().squeeze(1)
        rhs = h[cols] @ goal[row].double()
        expected[row, cols] = torch.linalg.solve(h[cols][:, cols], rhs)
    torch.testing.assert_close(full.double(), expected, rtol=1e-4, atol=1e-5)
    damped = prepared.damped
    objective = [residual_objective(goal - s, damped) for s in (plain, short, full)]
    assert objective[2] <= objective[1] <= objective[0] * (1 + 1e-6)
    assert objective[2] < objective[0]


def test_refit_with_a_low_rank_basis_solves_the_joint_problem():
    """With a basis V, S on the support and a free U jointly minimise tr(E H Eᵀ), E = T − S − U Vᵀ:
    per row a least-squares problem in (s on the support, u), solved directly in float64."""
    weight, hessian = correlated_problem(7, 23, seed=4)
    gen = torch.Generator().manual_seed(5)
    basis = torch.randn(23, 3, generator=gen, dtype=torch.float64)
    mask = SparsityPattern.parse("2:4").mask_from_scores(torch.rand(7, 23, generator=gen, dtype=torch.float64)[:, :20])
    mask = torch.cat([mask, torch.zeros(7, 3, dtype=torch.bool)], dim=1)  # 20 = 5 groups; 3 pruned columns
    fitted = refit_on_support(weight, hessian, mask, iterations=300, tolerance=1e-30, basis=basis)
    assert not bool(fitted[~mask].any())
    for r in range(7):
        cols = mask[r].nonzero().squeeze(1)
        design = torch.cat([torch.eye(23, dtype=torch.float64)[cols], basis.mT])  # (k + 3) x 23
        coef = torch.linalg.solve(design @ hessian @ design.mT, design @ hessian @ weight[r])
        torch.testing.assert_close(fitted[r, cols], coef[: len(cols)], rtol=1e-6, atol=1e-8)
