import pytest
import torch

from hasslefree.hessian import prepare_hessian
from hasslefree.lowrank import adam_lowrank, exact_lowrank, scaled_svd_lowrank, truncated_svd_lowrank
from hasslefree.objective import residual_objective

from helpers import correlated_problem


def _f(target, factors, h):
    return residual_objective(target - factors[0] @ factors[1].mT, h)


def test_exact_matches_a_symmetric_square_root_formulation():
    """Independent formulation: whiten with H^½ (eigendecomposition) instead of Cholesky."""
    target, hessian = correlated_problem(29, 41, seed=1)
    prepared = prepare_hessian(hessian)
    h = prepared.damped
    evals, evecs = torch.linalg.eigh(h)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    for rank in [1, 5, 17]:
        u, s, vt = torch.linalg.svd(target @ root, full_matrices=False)
        expected = (u[:, :rank] * s[:rank]) @ vt[:rank] @ inv_root
        ours = exact_lowrank(target, prepared, rank)
        torch.testing.assert_close(ours[0] @ ours[1].mT, expected, rtol=1e-8, atol=1e-9)


def test_exact_is_never_beaten_by_perturbations_or_adam():
    target, hessian = correlated_problem(23, 31, seed=2)
    prepared = prepare_hessian(hessian)
    h = prepared.damped
    rank = 4
    best = exact_lowrank(target, prepared, rank)
    f_best = _f(target, best, h)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        du = torch.randn(best[0].shape, generator=gen, dtype=torch.float64) * 1e-3
        dv = torch.randn(best[1].shape, generator=gen, dtype=torch.float64) * 1e-3
        assert _f(target, (best[0] + du, best[1] + dv), h) >= f_best
    for warm in [None, best]:
        adam = adam_lowrank(target, prepared, rank, warm=warm, steps=300, lr=0.5, iteration=0,
                            generator=torch.Generator().manual_seed(1))
        assert _f(target, adam, h) >= f_best * (1 - 1e-12)


def test_randomized_exact_matches_full_svd_with_margin():
    target, hessian = correlated_problem(60, 50, seed=3)
    prepared = prepare_hessian(hessian)
    full = _f(target, exact_lowrank(target, prepared, 6), prepared.damped)
    fast = _f(target, exact_lowrank(target, prepared, 6, randomized=True, oversample=10,
                                    power_iterations=3, generator=torch.Generator().manual_seed(0)),
              prepared.damped)
    assert full <= fast <= full * 1.001


def test_scaled_svd_is_exact_for_diagonal_hessian():
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(12, 18, generator=gen, dtype=torch.float64)
    diag = torch.diag(torch.rand(18, generator=gen, dtype=torch.float64) * 4 + 0.2)
    prepared = prepare_hessian(diag, percdamp=0.0)
    scaled = scaled_svd_lowrank(target, prepared, 3)
    exact = exact_lowrank(target, prepared, 3)
    assert _f(target, scaled, diag) == pytest.approx(_f(target, exact, diag), rel=1e-10)


def test_truncated_svd_is_eckart_young():
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(10, 14, generator=gen, dtype=torch.float64)
    u, v = truncated_svd_lowrank(target, None, 3)
    s = torch.linalg.svdvals(target)
    assert float((target - u @ v.T).norm() ** 2) == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-10)


def test_adam_gradient_matches_autograd():
    target, hessian = correlated_problem(7, 9, seed=6)
    prepared = prepare_hessian(hessian)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    # One plain-SGD-equivalent check: Adam's first step moves each coordinate by -lr*sign(grad).
    step = adam_lowrank(target, prepared, 2, warm=(u, v), steps=1, lr=1e-3 * 10, iteration=0, scaled=False)
    uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
    e = target - uu @ vv.T
    torch.trace(e @ prepared.damped @ e.T).backward()
    torch.testing.assert_close(torch.sign(u - step[0]), torch.sign(uu.grad))
    torch.testing.assert_close(torch.sign(v - step[1]), torch.sign(vv.grad))


def test_scaled_and_unscaled_adam_minimise_the_same_function():
    target, hessian = correlated_problem(15, 20, seed=7)
    prepared = prepare_hessian(hessian)
    h = prepared.damped
    optimum = _f(target, exact_lowrank(target, prepared, 3), h)
    start = exact_lowrank(target * 1.3, prepared, 3)  # a nearby, non-optimal warm start
    for scaled in [True, False]:
        result = adam_lowrank(target, prepared, 3, warm=start, steps=3000, lr=0.05, iteration=0, scaled=scaled)
        assert _f(target, result, h) == pytest.approx(optimum, rel=1e-3)
