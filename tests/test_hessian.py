import pytest
import torch

from hasslefree.hessian import HessianAccumulator, prepare_hessian


def test_mean_matches_xtx_over_any_leading_shape():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 7, generator=gen, dtype=torch.float64),
               torch.randn(3, 7, generator=gen, dtype=torch.float64),
               torch.randn(1, 1, 4, 7, generator=gen, dtype=torch.float64)]
    acc = HessianAccumulator(7, dtype=torch.float64)
    for b in batches:
        acc.add(b)
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    torch.testing.assert_close(acc.hessian, x.T @ x / x.shape[0])
    assert acc.tokens == 17


def test_split_sums_give_the_same_float32_hessian_in_any_order():
    """What the processes of a distributed run rely on: sums of shards, merged, equal one pass."""
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 37, 53, generator=gen) * (1 + i) for i in range(11)]
    whole = HessianAccumulator(53)
    for b in batches:
        whole.add(b)
    left, right = HessianAccumulator(53), HessianAccumulator(53)
    for b in batches[:4]:
        left.add(b)
    for b in reversed(batches[4:]):
        right.add(b)
    left.merge_from(left.total + right.total, left.tokens + right.tokens)
    assert left.tokens == whole.tokens == 11 * 3 * 37
    assert whole.hessian.dtype == torch.float32
    assert torch.equal(left.hessian, whole.hessian)
    x = torch.cat([b.reshape(-1, 53) for b in batches]).double()
    torch.testing.assert_close(whole.hessian.double(), x.T @ x / x.shape[0], rtol=1e-6, atol=1e-5)


def test_hessian_before_any_token_is_zero():
    assert torch.equal(HessianAccumulator(4).hessian, torch.zeros(4, 4))


def test_width_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        HessianAccumulator(7).add(torch.randn(3, 8))


def test_dead_inputs_and_damping():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 2] = 0
    prepared = prepare_hessian(x.T @ x / 50, percdamp=0.01)
    assert prepared.dead.tolist() == [False, False, True, False, False, False]
    assert prepared.raw[2, 2] == 1.0
    mean_diag = prepared.raw.diagonal().mean()
    torch.testing.assert_close(prepared.damped - prepared.raw, 0.01 * mean_diag * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(prepared.chol @ prepared.chol.T, prepared.damped)
    upper = prepared.inverse_cholesky_upper()
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(prepared.damped))


def test_cholesky_escalates_damping_on_indefinite_matrix():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    prepared = prepare_hessian(h, percdamp=0.0)
    assert prepared.damping > 0.5
    torch.testing.assert_close(prepared.chol @ prepared.chol.T, prepared.damped)
