"""Our presets against a straightforward implementation of the published loop.

The reference (benchmarks/official_reference.py) follows the published algorithm as written:
SparseGPT's column loop, then Adam with autograd on the (out x out) trace. Our `hassle-free`
preset computes the same iterates with closed-form gradients and no (out x out) matrix.
"""

import sys
from pathlib import Path

import pytest
import torch

import hasslefree as hf

from helpers import correlated_problem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_reference import official_loop  # noqa: E402


@pytest.mark.parametrize("shape,rank,seed", [((24, 32), 4, 1), ((13, 40), 3, 2)])
def test_hassle_free_preset_reproduces_the_published_loop(shape, rank, seed):
    weight, hessian = correlated_problem(*shape, tokens=300, seed=seed, dtype=torch.float32)
    published, _ = official_loop(weight, hessian, rank, 2, 4, iterations=5)
    ours = hf.decompose_layer(weight, hessian, "2:4", rank, "hassle-free", iterations=5)
    best_so_far = [min(ours.history[: i + 1]) for i in range(5)]
    assert best_so_far == pytest.approx(published, rel=1e-3)


def test_fast_preset_is_at_or_below_the_published_objective():
    weight, hessian = correlated_problem(24, 32, tokens=300, seed=3, dtype=torch.float32)
    published, _ = official_loop(weight, hessian, 4, 2, 4, iterations=8)
    for options in [{}, {"lowrank_options": {"randomized": True, "oversample": 8}}]:
        fast = hf.decompose_layer(weight, hessian, "2:4", 4, "hassle-free-exact", iterations=8, **options)
        assert min(fast.history) <= published[-1] * 1.001


@pytest.mark.parametrize("shape,rank,seed", [((40, 64), 4, 4), ((36, 52), 6, 5), ((64, 44), 5, 6)])
def test_fastest_preset_at_its_own_iterations_ends_below_80_published_iterations(shape, rank, seed):
    weight, hessian = correlated_problem(*shape, tokens=400, seed=seed, dtype=torch.float32)
    published, _ = official_loop(weight, hessian, rank, 2, 4, iterations=80)
    fast = hf.decompose_layer(weight, hessian, "2:4", rank, "hassle-free-fast")
    assert len(fast.history) == hf.PRESETS["hassle-free-fast"].iterations
    assert min(fast.history) <= published[-1] * 1.001
