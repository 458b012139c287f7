"""SparseLowRankLinear: forward maths, dense merge, rank 0 and module replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hasslefree.nn import SparseLowRankLinear, replace_linear


def _random_layer(out_f: int, in_f: int, rank: int, bias: bool, seed: int = 0) -> SparseLowRankLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[torch.rand(out_f, in_f, generator=g) < 0.5] = 0
    U = torch.randn(out_f, rank, generator=g)
    V = torch.randn(in_f, rank, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    return SparseLowRankLinear.from_linear_parts(w, U, V, b, pattern="unstructured")


@pytest.mark.parametrize("rank", [0, 1, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_dense_and_float64(rank: int, bias: bool) -> None:
    layer = _random_layer(24, 40, rank, bias)
    x = torch.randn(3, 5, 40)
    y = layer(x)
    assert y.shape == (3, 5, 24)
    ref = x @ layer.to_dense().T + (layer.bias if bias else 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # Independent float64 computation from the raw parts.
    w64 = layer.sparse_weight.double() + layer.U.double() @ layer.V.double().T
    ref64 = x.double() @ w64.T + (layer.bias.double() if bias else 0)
    torch.testing.assert_close(y.double(), ref64, rtol=1e-5, atol=1e-5)


def test_attributes_and_rank_zero() -> None:
    w = torch.randn(6, 10)
    layer = SparseLowRankLinear.from_linear_parts(w, None, None, pattern="unstructured")
    assert (layer.in_features, layer.out_features, layer.rank) == (10, 6, 0)
    assert layer.U.shape == (6, 0) and layer.V.shape == (10, 0)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), x @ w.T)
    assert torch.equal(layer.to_dense(), w)
    assert "rank=0" in repr(layer)


def test_negative_zero_normalised() -> None:
    w = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
    layer = SparseLowRankLinear.from_linear_parts(w, None, None)
    assert not torch.signbit(layer.sparse_weight).any()


def test_bf16_dense_merge_dtype() -> None:
    layer = _random_layer(8, 12, 4, bias=False).to(torch.bfloat16)
    dense = layer.to_dense()
    assert dense.dtype == torch.bfloat16
    exact = layer.sparse_weight.float() + layer.U.float() @ layer.V.float().T
    assert torch.equal(dense, exact.to(torch.bfloat16))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        SparseLowRankLinear.from_linear_parts(torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="bias"):
        SparseLowRankLinear.from_linear_parts(torch.zeros(4, 6), None, None, bias=torch.zeros(3))


def test_replace_linear_in_model() -> None:
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3)))
    x = torch.randn(2, 10)
    old_lin = model[2][0]
    new = SparseLowRankLinear.from_linear_parts(old_lin.weight.detach(), None, None, old_lin.bias.detach())
    ref = model(x)
    returned = replace_linear(model, "2.0", new)
    assert returned is old_lin and model[2][0] is new
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(AttributeError):
        replace_linear(model, "2.7", new)


def test_gradients_flow() -> None:
    layer = _random_layer(5, 7, 2, bias=True)
    layer(torch.randn(3, 7)).sum().backward()
    assert layer.U.grad is not None and layer.V.grad is not None and layer.sparse_weight.grad is not None
