"""Tests for the sparse + HSS layer: structure, counts, permutations, data-aware fit, errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from hasslefree.hss import (
    VARIANTS,
    HSSLinear,
    HSSMatrix,
    RankRule,
    compress_linear_hss,
    damp_hessian,
    fit_hss,
    hss_parameter_count,
    hss_partition,
    layer_objective,
    magnitude_sparse,
    outer_rank_for_budget,
    pattern_bandwidth,
    rcm_permutation,
    sparse_count,
)
from hasslefree.hss.budget import hss_parameter_count_pow2

F64 = torch.float64
SHAPES = [(97, 203), (300, 128), (64, 64), (1, 50), (50, 1), (7, 9)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n_in: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with strongly correlated, unevenly scaled features and their H = X^T X."""
    g = _gen(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=F64) * torch.logspace(0, -2, n_in, dtype=F64)
    x = torch.randn(tokens, n_in, generator=g, dtype=F64) @ mix.T
    x = x * torch.logspace(0.5, -0.5, n_in, dtype=F64)[torch.randperm(n_in, generator=g)]
    return x, x.T @ x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("leaf", [1, 8, 32])
def test_matmul_matches_dense(shape, leaf):
    a = torch.randn(shape, generator=_gen(1), dtype=F64)
    hss = fit_hss(a, outer_rank=6, leaf=leaf, rule=RankRule(min_rank=2))
    x = torch.randn(2, 3, shape[1], generator=_gen(2), dtype=F64)
    y = hss.matmul(x)
    assert y.shape == (2, 3, shape[0])
    torch.testing.assert_close(y, x @ hss.to_dense().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hss(x[0, 0]), hss.to_dense() @ x[0, 0])


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_is_exact(shape):
    a = torch.randn(shape, generator=_gen(3), dtype=F64)
    hss = fit_hss(a, outer_rank=max(shape), leaf=8, rule=RankRule(decay=1.0, min_rank=0))
    torch.testing.assert_close(hss.to_dense(), a, rtol=0, atol=1e-12)


def test_partition_tiles_the_matrix():
    leaves, lowrank = hss_partition((97, 203), outer_rank=1000, leaf=16, rule=RankRule(decay=1.0))
    cover = torch.zeros(97, 203, dtype=torch.int64)
    for b in [*leaves, *lowrank]:
        cover[b.r0 : b.r1, b.c0 : b.c1] += 1
    assert bool((cover == 1).all())
    assert all(max(b.r1 - b.r0, b.c1 - b.c0) <= 16 for b in leaves)
    assert all(b.rank == min(b.r1 - b.r0, b.c1 - b.c0) for b in lowrank)


def test_rank_rule_halves_and_floors():
    rule = RankRule(min_rank=16)
    assert [rule.rank(512, d, 10_000, 10_000) for d in range(7)] == [512, 256, 128, 64, 32, 16, 16]
    assert rule.rank(512, 0, 100, 3000) == 100  # never above the block's min dimension
    assert rule.rank(8, 3, 100, 100) == 8  # floor never lifts a block above the outer rank
    assert rule.rank(0, 0, 100, 100) == 0


@pytest.mark.parametrize("shape", [(97, 203), (300, 128), (576, 1536), (4096, 4096), (11008, 4096), (1, 7)])
@pytest.mark.parametrize("outer,leaf,rule", [(0, 64, RankRule()), (64, 64, RankRule()), (512, 256, RankRule(0.7, 4)), (5, 3, RankRule(1.0, 0))])
def test_parameter_count_formula(shape, outer, leaf, rule):
    expected = hss_parameter_count(shape, outer, leaf, rule)
    if shape[0] * shape[1] <= 300 * 300 or leaf >= 64:
        leaves, lowrank = hss_partition(shape, outer, leaf, rule)
        tree = sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in leaves)
        tree += sum(b.rank * (b.r1 - b.r0 + b.c1 - b.c0) for b in lowrank)
        assert tree == expected
    if shape[0] * shape[1] <= 300 * 300:
        hss = fit_hss(torch.randn(shape, generator=_gen(4)), outer, leaf, rule)
        assert hss.parameter_count() == expected


@pytest.mark.parametrize("n,leaf", [(256, 32), (1024, 256), (4096, 256), (64, 64)])
def test_parameter_count_closed_form(n, leaf):
    for outer in (0, 16, 100, 512):
        assert hss_parameter_count((n, n), outer, leaf) == hss_parameter_count_pow2(n, outer, leaf)


def test_sparse_count_is_exact_even_with_ties():
    w = torch.zeros(10, 10)
    w[0, :3] = 1.0
    s = magnitude_sparse(w, 0.3)
    assert s.nnz == sparse_count(100, 0.3) == 30
    w = torch.randn(97, 203, generator=_gen(5))
    s = magnitude_sparse(w, 0.3)
    kept = s.to_dense() != 0
    assert s.nnz == int(0.3 * 97 * 203)
    assert w.abs()[kept].min() >= w.abs()[~kept].max()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(97, 203), (300, 128)])
def test_layer_output_in_original_order(variant, shape):
    w = torch.randn(shape, generator=_gen(6), dtype=F64)
    _, h = _correlated(shape[1], 400)
    bias = torch.randn(shape[0], generator=_gen(7), dtype=F64)
    layer = compress_linear_hss(w, bias, sparsity=0.3, outer_rank=8, leaf=16, min_rank=2, variant=variant, hessian=h)
    for perm, size in ((layer.row_perm, shape[0]), (layer.col_perm, shape[1])):
        assert torch.equal(perm.sort().values, torch.arange(size))
    if "rcm" in variant:
        assert not torch.equal(layer.col_perm, torch.arange(shape[1]))
    x = torch.randn(4, 5, shape[1], generator=_gen(8), dtype=F64)
    w_hat = layer.to_dense()
    torch.testing.assert_close(layer(x), x @ w_hat.T + bias, rtol=1e-10, atol=1e-10)
    if "whitened" not in variant:
        # Frobenius leaves copy the residual exactly: map them back through the permutation.
        for b in layer.hss.leaves:
            rows, cols = layer.row_perm[b.r0 : b.r1], layer.col_perm[b.c0 : b.c1]
            torch.testing.assert_close(w_hat[rows][:, cols], w[rows][:, cols], rtol=0, atol=1e-12)
    assert layer.parameter_count() == sparse_count(w.numel(), 0.3) + layer.hss.parameter_count() + shape[0]


@pytest.mark.parametrize("variant", ["shss", "shss-rcm"])
def test_full_rank_layer_reproduces_weight(variant):
    w = torch.randn(97, 203, generator=_gen(9), dtype=F64)
    layer = compress_linear_hss(w, sparsity=0.3, outer_rank=203, leaf=16, rank_decay=1.0, variant=variant)
    torch.testing.assert_close(layer.to_dense(), w, rtol=0, atol=1e-12)
    x = torch.randn(3, 203, generator=_gen(10), dtype=F64)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,band", [((200, 200), 3), ((120, 360), 6)])
def test_rcm_reduces_bandwidth(shape, band):
    m, n = shape
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    rows, cols = np.nonzero(np.abs(i * (n / m) - j) <= band)
    g = np.random.default_rng(0)
    pr, pc = g.permutation(m), g.permutation(n)  # scramble: entry (i, j) moves to (pr[i], pc[j])
    rows, cols = pr[rows], pc[cols]
    before = pattern_bandwidth(rows, cols, shape)
    rp, cp = rcm_permutation(rows, cols, shape)
    after = pattern_bandwidth(rows, cols, shape, rp, cp)
    assert sorted(rp) == list(range(m)) and sorted(cp) == list(range(n))
    assert before > 0.5 * n
    assert after <= 3 * band + 2, (before, after)


def test_data_aware_beats_frobenius_on_objective():
    w = torch.randn(96, 160, generator=_gen(11), dtype=F64)
    _, h = _correlated(160, 600, seed=12)
    kw = dict(sparsity=0.3, outer_rank=8, leaf=20, min_rank=2)
    for plain, aware in (("shss", "shss-whitened"), ("shss-rcm", "shss-rcm-whitened")):
        f_plain = layer_objective(w - compress_linear_hss(w, variant=plain, **kw).to_dense(), h)
        f_aware = layer_objective(w - compress_linear_hss(w, variant=aware, hessian=h, **kw).to_dense(), h)
        assert f_aware <= f_plain, (plain, f_aware, f_plain)
    # Identity H: the data-aware fit reduces to the Frobenius one.
    eye = torch.eye(160, dtype=F64)
    a = compress_linear_hss(w, variant="shss", **kw).to_dense()
    b = compress_linear_hss(w, variant="shss-whitened", hessian=eye, percdamp=0.0, **kw).to_dense()
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_sweeps_never_increase_damped_objective():
    a = torch.randn(64, 96, generator=_gen(13), dtype=F64)
    _, h = _correlated(96, 300, seed=14)
    hd = damp_hessian(h)
    values = [
        layer_objective(a - fit_hss(a, 6, 12, RankRule(min_rank=2), h, sweeps=s).to_dense(), hd) for s in range(4)
    ]
    assert all(later <= earlier * (1 + 1e-10) for earlier, later in zip(values, values[1:])), values


def test_damping_escalates_on_singular_hessian():
    x = torch.randn(3, 20, generator=_gen(15), dtype=F64)
    h = x.T @ x  # rank 3
    h[:, 5] = 0.0
    h[5, :] = 0.0  # a dead input
    hd = damp_hessian(h, percdamp=0.0)
    torch.linalg.cholesky(hd)
    assert hd[5, 5] >= 1.0
    torch.linalg.cholesky(damp_hessian(torch.zeros(4, 4)))


def test_state_round_trip():
    w = torch.randn(97, 203, generator=_gen(16))
    layer = compress_linear_hss(w, torch.randn(97, generator=_gen(17)), sparsity=0.2, outer_rank=8, leaf=16)
    tensors, spec = layer.to_state()
    spec = json.loads(json.dumps(spec))
    assert all(isinstance(t, torch.Tensor) and not t.is_sparse for t in tensors.values())
    clone = HSSLinear.from_state({k: v.clone() for k, v in tensors.items()}, spec)
    x = torch.randn(5, 203, generator=_gen(18))
    torch.testing.assert_close(clone(x), layer(x))
    assert clone.parameter_count() == layer.parameter_count()
    assert clone.config == layer.config and layer.config["variant"] == "shss-rcm"
    expected = HSSLinear.state_shapes(spec)
    assert set(expected) == set(tensors)
    for name, t in tensors.items():
        assert (tuple(t.shape), str(t.dtype).removeprefix("torch.")) == expected[name], name
    assert layer.config["outer_rank"] == 8 and layer.config["sparsity"] == 0.2
    other = compress_linear_hss(w, torch.zeros(97), sparsity=0.2, outer_rank=8, leaf=16, variant="shss")
    other.load_state_dict(layer.state_dict())  # same tree, different permutations
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))
    hss_tensors, hss_spec = layer.hss.to_state()
    torch.testing.assert_close(HSSMatrix.from_state(hss_tensors, hss_spec).to_dense(), layer.hss.to_dense())
    with pytest.raises(ValueError, match="missing HSS tensor"):
        HSSMatrix.from_state({}, hss_spec)


def test_budget_bisection():
    shape, sparsity, leaf, rule = (576, 1536), 0.3, 64, RankRule(min_rank=8)
    budget = int(0.6 * shape[0] * shape[1])
    r = outer_rank_for_budget(shape, sparsity, budget, leaf, rule)
    total = lambda k: sparse_count(shape[0] * shape[1], sparsity) + hss_parameter_count(shape, k, leaf, rule)  # noqa: E731
    assert total(r) <= budget < total(r + 1)
    with pytest.raises(ValueError, match="below the minimum"):
        outer_rank_for_budget(shape, sparsity, 1000, leaf, rule)
    w = torch.randn(96, 160, generator=_gen(19))
    budget = 8000
    layer = compress_linear_hss(w, sparsity=0.3, leaf=np.int64(16), min_rank=2, budget_params=np.int64(budget))
    assert layer.parameter_count() <= budget
    assert layer.config["outer_rank"] == outer_rank_for_budget((96, 160), 0.3, budget, 16, RankRule(min_rank=2))


def test_float32_layer_and_gradients():
    w = torch.randn(40, 70, generator=_gen(20))
    layer = compress_linear_hss(w, sparsity=0.3, outer_rank=4, leaf=8, min_rank=1)
    assert layer.s_values.dtype == torch.float32 and layer.hss.p[0].dtype == torch.float32
    x = torch.randn(6, 70, generator=_gen(21))
    layer(x).square().sum().backward()
    assert layer.s_values.grad is not None and layer.hss.p[0].grad is not None


BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(leaf=0), "leaf"),
    (dict(outer_rank=-1), "outer_rank"),
    (dict(variant="shss-rcm-whitened"), "needs hessian"),
    (dict(variant="nope"), "unknown variant"),
    (dict(variant="shss-whitened", hessian=torch.eye(5)), "hessian must have shape"),
    (dict(outer_rank=8, budget_params=100), "not both"),
    (dict(min_rank=-1), "min_rank"),
    (dict(leaf=2.5), "leaf"),
    (dict(rank_decay=0.0), "rank_decay"),
    (dict(sweeps=-1), "sweeps"),
    (dict(percdamp=-1.0), "percdamp"),
    (dict(budget_params=10), "below the minimum"),
]


@pytest.mark.parametrize("kwargs,msg", BAD)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        compress_linear_hss(torch.randn(12, 10), **kwargs)


def test_bad_tensors():
    w = torch.randn(12, 10)
    with pytest.raises(ValueError, match="2-D"):
        compress_linear_hss(torch.randn(12))
    with pytest.raises(ValueError, match="bias must have shape"):
        compress_linear_hss(w, torch.randn(10))
    for name, bad in (("weight", w.clone()), ("hessian", torch.eye(10))):
        bad[0, 0] = float("nan")
        kw = {"hessian": bad, "variant": "shss-whitened"} if name == "hessian" else {}
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            compress_linear_hss(w if name == "hessian" else bad, **kw)
    w_inf = w.clone()
    w_inf[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress_linear_hss(w_inf)


@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_safetensors_round_trip(tmp_path, sparsity):
    st = pytest.importorskip("safetensors.torch")
    w = torch.randn(40, 70, generator=_gen(22))
    layer = compress_linear_hss(w, sparsity=sparsity, outer_rank=4, leaf=8, min_rank=1)
    tensors, spec = layer.to_state()
    st.save_file(tensors, str(tmp_path / "layer.safetensors"))
    (tmp_path / "layer.json").write_text(json.dumps(spec))
    clone = HSSLinear.from_state(st.load_file(str(tmp_path / "layer.safetensors")), json.loads((tmp_path / "layer.json").read_text()))
    x = torch.randn(3, 70, generator=_gen(23))
    torch.testing.assert_close(clone(x), layer(x))
