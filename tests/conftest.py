"""Shared fixtures: small random layer problems of awkward sizes, in float64."""

from __future__ import annotations

import pytest
import torch

from hasslefree.hessian import prepare_hessian


def correlated_problem(out_features: int, in_features: int, tokens: int = 400, seed: int = 0,
                       dtype: torch.dtype = torch.float64):
    """A weight and the Hessian of correlated, unevenly scaled inputs (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen, dtype=dtype) * 0.3 + torch.eye(in_features, dtype=dtype)
    scales = torch.rand(in_features, generator=gen, dtype=dtype) * 3 + 0.1
    x = (torch.randn(tokens, in_features, generator=gen, dtype=dtype) @ mix) * scales
    weight = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    return weight, x.T @ x / tokens


@pytest.fixture
def problem():
    weight, hessian = correlated_problem(37, 48)
    return weight, hessian, prepare_hessian(hessian)
