"""The numba CPU decode kernels of PackedSparseLowRankLinear: against a float64 dense reference
and the pure-torch paths, routing in ``forward``, and the fallback when numba is unavailable.

Without numba the kernel tests skip locally and fail where ``HASSLEFREE_REQUIRE_DATA=1`` (CI),
where numba comes with the ``models`` extra; the fallback tests run either way."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import Tensor

from hasslefree.nn import PackedSparseLowRankLinear, SparseLowRankLinear, decode_kernels
from hasslefree.nn import packed_dispatch
from helpers import make_layer, reference, unavailable

torch.set_num_threads(1)

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False
NM_PATTERNS = ["1:4", "2:4", "4:8", "2:8", "3:8", "1:2", "2:6"]  # 2:6: positions coded in 3 bits, M < 2**3
TOKENS = [1, 3, 8]
DTYPES = [torch.float32, torch.bfloat16]
LOW_RANK = [(0, False), (0, True), (5, False), (5, True)]  # (rank, bias)


@pytest.fixture
def kernels() -> None:
    """Kernel tests need numba: a failure where required (CI), a skip elsewhere."""
    if not HAVE_NUMBA:
        unavailable("numba is not installed (pip install -e '.[models]')")
    assert decode_kernels() is not None, "numba imports but the kernels do not load"


def tolerance(m: SparseLowRankLinear, x: Tensor, kernel: bool = True) -> Tensor:
    """Bound on |y - y_float64| for every output, relative to ``mag`` = Σ|terms| of its sum."""
    _, mag = reference(m, x)
    # float32 accumulation: an output sums in + rank products (the sparse part in four partial
    # sums, then the low-rank term and the bias), every product and addition rounded once with
    # unit roundoff 2^-24, so |err| <= (terms + a few)·2^-24·mag (the classic dot-product bound).
    f32 = (m.in_features + m.rank + 6) * 2.0**-24 * mag
    if x.dtype == torch.float32:
        return f32
    if kernel:
        # bfloat16 keeps 8 significant bits: unit roundoff 2^-8. bf16 inputs and weights are exact
        # in float32 and the kernel accumulates everything in float32, so it rounds once, at the
        # output: |err| <= 2^-8·|y| + the float32 error above, and |y| <= mag.
        return 2.0**-8 * mag + f32
    # The torch paths round to bf16 after every op (W_S product, x V, (x V) Uᵀ, the sum, the bias):
    # the bound of test_packed_linear.check_close.
    return 8 * 2.0**-9 * mag


def assert_close_ref(got: Tensor, m: SparseLowRankLinear, x: Tensor, kernel: bool = True) -> None:
    y, _ = reference(m, x)
    assert got.shape == y.shape and got.dtype == x.dtype
    tol = tolerance(m, x, kernel)
    err = (got.double() - y).abs()
    assert bool((err <= tol + 1e-30).all()), f"max error {err.max():.3e}, worst ratio {(err / (tol + 1e-30)).max():.2f}"


def assert_close_paths(got: Tensor, torch_path: Tensor, m: SparseLowRankLinear, x: Tensor) -> None:
    """Kernel and torch path, each within its bound of the float64 result, differ by at most the
    sum of the two bounds."""
    tol = tolerance(m, x) + tolerance(m, x, kernel=False)
    err = (got.double() - torch_path.double()).abs()
    assert bool((err <= tol + 1e-30).all()), f"max difference {err.max():.3e}"


def inputs(in_f: int, dtype: torch.dtype, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, in_f, generator=g).to(dtype) for t in TOKENS]


# ----------------------------------------------------------------- against float64 and torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, bias", LOW_RANK)
@pytest.mark.parametrize("in_f", [56, 50])  # 50: a zero-padded last group for M = 4, 6, 8
@pytest.mark.parametrize("pattern", NM_PATTERNS)
def test_nm_kernel_matches_float64_and_torch(kernels: None, pattern: str, in_f: int, rank: int, bias: bool,
                                             dtype: torch.dtype) -> None:
    m = make_layer(37, in_f, pattern, rank, bias, dtype, seed=in_f + rank)  # 37 rows: a partial row block
    p = PackedSparseLowRankLinear.from_module(m)
    for x in inputs(in_f, dtype):
        got = p.forward_kernel(x)
        assert_close_ref(got, m, x)
        with torch.no_grad():
            assert_close_paths(got, p.forward_gather(x), m, x)
            assert_close_paths(got, p.forward_tiled(x), m, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, bias", LOW_RANK)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_unstructured_kernel_matches_float64_and_torch(kernels: None, density: float, rank: int, bias: bool,
                                                       dtype: torch.dtype) -> None:
    m = make_layer(37, 53, "unstructured", rank, bias, dtype, density=density, seed=int(density * 10) + rank)
    p = PackedSparseLowRankLinear.from_module(m)
    for x in inputs(53, dtype, seed=2):
        got = p.forward_kernel(x)
        assert_close_ref(got, m, x)
        with torch.no_grad():
            assert_close_paths(got, p.forward_tiled(x), m, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, bias", LOW_RANK)
@pytest.mark.parametrize("pattern, in_f, density", [("2:4", 64, 0.5), ("2:4", 112, 0.5), ("unstructured", 64, 0.3),
                                                    ("unstructured", 61, 0.5), ("unstructured", 127, 1.0),
                                                    ("unstructured", 64, 0.0)])
def test_masked_expand_path_matches_float64(kernels: None, monkeypatch, pattern: str, in_f: int, density: float,
                                            rank: int, bias: bool, dtype: torch.dtype) -> None:
    """One token on 2:4 rows of a width divisible by 16, or bit-mask rows of an even byte count:
    the masked-expand kernel runs (counted) and is within the float32 bound of the float64 result."""
    from hasslefree.nn import packed_kernels

    monkeypatch.setattr(packed_kernels, "HAVE_AVX2", False)  # 2:4 would take the permute path
    calls = []
    original = packed_kernels._masked_single_token_kernel
    monkeypatch.setattr(packed_kernels, "_masked_single_token_kernel", lambda *a: calls.append(1) or original(*a))
    m = make_layer(45, in_f, pattern, rank, bias, dtype, density=density, seed=in_f + rank)
    p = PackedSparseLowRankLinear.from_module(m)
    g = torch.Generator().manual_seed(7)
    for scale in (1.0, 1e-3, 1e3):
        x = (torch.randn(1, in_f, generator=g) * scale).to(dtype)
        assert_close_ref(p.forward_kernel(x), m, x)
    assert len(calls) == 3
    x3 = torch.randn(3, in_f, generator=g).to(dtype)  # several tokens: the general kernels
    assert_close_ref(p.forward_kernel(x3), m, x3)
    assert len(calls) == 3


def _check_avx2_route(monkeypatch: pytest.MonkeyPatch, kernel: str, m: SparseLowRankLinear, seed: int) -> None:
    """1, 3 and 8 tokens at input scales far from 1: within the float32 bound of float64, and
    the AVX2 kernel ``kernel`` ran every time (never on a CPU without AVX2)."""
    from hasslefree.nn import packed_kernels

    calls = []
    original = getattr(packed_kernels, kernel)
    monkeypatch.setattr(packed_kernels, kernel, lambda *a: calls.append(1) or original(*a))
    p = PackedSparseLowRankLinear.from_module(m)
    g = torch.Generator().manual_seed(seed)
    runs = 0
    for tokens in TOKENS:
        for scale in (1.0, 1e-3, 1e3):
            x = (torch.randn(tokens, m.in_features, generator=g) * scale).to(m.sparse_weight.dtype)
            assert_close_ref(p.forward_kernel(x), m, x)
            runs += 1
    assert len(calls) == (runs if packed_kernels.HAVE_AVX2 else 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, bias", LOW_RANK + [(7, True)])  # 7: a low-rank tail past the 4 partial sums
@pytest.mark.parametrize("in_f", [16, 48, 112, 1024])  # 1, 3 (odd), 7 and 64 chunks of 16 inputs
def test_two_four_permute_path_matches_float64(kernels: None, monkeypatch, in_f: int, rank: int, bias: bool,
                                               dtype: torch.dtype) -> None:
    """2:4 rows of a width divisible by 16 on an AVX2 CPU, 1 to 8 tokens: the permute kernel runs
    (counted; on a CPU without AVX2 it must not) and is within the float32 bound of float64,
    at input scales far from 1."""
    m = make_layer(45, in_f, "2:4", rank, bias, dtype, seed=in_f + rank)  # 45 rows: a partial row block
    _check_avx2_route(monkeypatch, "_two_four_kernel", m, seed=11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, bias", LOW_RANK)
@pytest.mark.parametrize("in_f, density", [(8, 0.5), (53, 0.05), (64, 0.3), (127, 0.5), (200, 1.0), (64, 0.0)])
def test_bitmask_permute_path_matches_float64(kernels: None, monkeypatch, in_f: int, density: float, rank: int,
                                              bias: bool, dtype: torch.dtype) -> None:
    """Bit-mask rows on an AVX2 CPU, 1 to 8 tokens: the permute kernel runs (counted; not without
    AVX2) and is within the float32 bound of float64 — its vector rows and the last rows, whose
    8-value loads would pass the end of the values (at density 0.05 several rows; at 0 all), which
    take the scalar walk."""
    m = make_layer(37, in_f, "unstructured", rank, bias, dtype, density=density, seed=in_f + rank)
    _check_avx2_route(monkeypatch, "_bitmask_kernel", m, seed=13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern, in_f", [("2:4", 1000), ("5:300", 650), ("unstructured", 1001)])
def test_kernel_larger_layers(kernels: None, pattern: str, in_f: int, dtype: torch.dtype) -> None:
    """Several row blocks and V blocks; 5:300 codes positions in 9 bits, across byte boundaries."""
    m = make_layer(203, in_f, pattern, 7, True, dtype, density=0.4, seed=3)
    p = PackedSparseLowRankLinear.from_module(m)
    for x in inputs(in_f, dtype, seed=4):
        assert_close_ref(p.forward_kernel(x), m, x)


def test_kernel_empty_and_rank_only_layers(kernels: None) -> None:
    for pattern in ("2:4", "unstructured"):
        m = make_layer(5, 8, pattern, 3, True, density=0.0)
        with torch.no_grad():
            m.sparse_weight.zero_()
        p = PackedSparseLowRankLinear.from_module(m)
        x = torch.randn(2, 8)
        assert_close_ref(p.forward_kernel(x), m, x)


def test_kernel_does_not_depend_on_threads(kernels: None) -> None:
    """Fixed summation order: the same bits on 1 thread and on every thread numba has."""
    m = make_layer(64, 600, "2:4", 5, True, seed=5)
    p = PackedSparseLowRankLinear.from_module(m)
    x = torch.randn(3, 600)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = p.forward_kernel(x)
        torch.set_num_threads(max(2, before))
        many = p.forward_kernel(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


# ----------------------------------------------------------------- routing in forward
def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make forward paths (layer methods, or the dispatcher's ``_decoder``, which every kernel
    call of a fresh layer goes through) fail if they run."""
    def boom(*args, **kwargs):
        raise AssertionError("this path should not run")

    for name in names:
        monkeypatch.setattr(packed_dispatch if name == "_decoder" else PackedSparseLowRankLinear, name, boom)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_forward_uses_kernel_for_cpu_decode(kernels: None, monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    m = make_layer(37, 56, pattern, 4, True)
    p = PackedSparseLowRankLinear.from_module(m)
    x = torch.randn(2, 3, 56)  # 6 tokens <= decode_tokens
    expected = p.forward_kernel(x.reshape(-1, 56)).view(2, 3, 37)
    _forbid(monkeypatch, "forward_gather", "forward_tiled")
    with torch.no_grad():
        y = p(x)
    assert torch.equal(y, expected)
    assert_close_ref(y.view(6, 37), m, x.view(6, 56))


def test_forward_keeps_torch_paths_elsewhere(kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    p = PackedSparseLowRankLinear.from_module(make_layer(16, 24, "2:4", 2, True))
    _forbid(monkeypatch, "_decoder")
    p(torch.randn(3, 24)).sum().backward()  # autograd: the gather path, gradients flow
    assert p.U.grad is not None and p.bias.grad is not None
    with torch.no_grad():
        p(torch.randn(9, 24))  # more than decode_tokens: tiled
        p.double()(torch.randn(2, 24, dtype=torch.float64))  # no float64 kernel: gather
    meta = PackedSparseLowRankLinear.from_module(make_layer(16, 24, "unstructured", 2, True)).to("meta")
    assert packed_dispatch.kernels_for(meta, torch.empty(2, 24, device="meta")) is None  # other devices: torch paths


def test_row_offsets_cached_and_refreshed(kernels: None) -> None:
    m = make_layer(12, 20, "unstructured", 1, False, density=0.5)
    p = PackedSparseLowRankLinear.from_module(m)
    first = packed_dispatch.row_offsets(p)
    assert packed_dispatch.row_offsets(p) is first  # computed once
    assert first.tolist()[-1] == p.values.numel()
    assert "_offsets_cache" not in dict(p.named_buffers()) and "_offsets_cache" not in p.state_dict()
    with torch.no_grad():
        p.mask[0, 0] = 0  # an in-place change is noticed (and the broken popcount rejected)
    with pytest.raises(ValueError, match="mask marks"):
        packed_dispatch.row_offsets(p)


# ----------------------------------------------------------------- fallback
def _decode_outputs(layers: list[tuple[SparseLowRankLinear, PackedSparseLowRankLinear]], dtype: torch.dtype) -> None:
    """Decode-sized forwards through the torch fallback, within the torch paths' bound."""
    for m, p in layers:
        for x in inputs(m.in_features, dtype, seed=7):
            with torch.no_grad():
                assert_close_ref(p(x), m, x, kernel=False)


def test_fallback_warns_once_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = [(m, PackedSparseLowRankLinear.from_module(m))
              for m in (make_layer(37, 50, "2:4", 3, True), make_layer(21, 53, "unstructured", 2, False))]
    monkeypatch.setitem(sys.modules, "hasslefree.nn.packed_kernels", None)  # import now fails
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delenv(packed_dispatch.NO_KERNELS_ENV, raising=False)
    packed_dispatch._load_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _decode_outputs(layers, torch.float32)
            _decode_outputs(layers, torch.float32)
        numba_warnings = [w for w in caught if "numba is not available" in str(w.message)]
        assert len(numba_warnings) == 1 and numba_warnings[0].category is RuntimeWarning
        assert decode_kernels() is None
        with pytest.raises(RuntimeError, match="unavailable"):
            layers[0][1].forward_kernel(torch.randn(1, 50))
    finally:
        packed_dispatch._load_kernels.cache_clear()  # the next use imports for real again


@pytest.mark.parametrize("dtype", DTYPES)
def test_env_var_disables_kernel(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    layers = [(m, PackedSparseLowRankLinear.from_module(m))
              for m in (make_layer(37, 50, "3:8", 3, True, dtype), make_layer(21, 53, "unstructured", 2, True, dtype))]
    monkeypatch.setenv(packed_dispatch.NO_KERNELS_ENV, "1")
    _forbid(monkeypatch, "_decoder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        _decode_outputs(layers, dtype)
    assert decode_kernels() is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern, in_f", [*((p, 50) for p in NM_PATTERNS), ("2:4", 64), ("unstructured", 53),
                                           ("unstructured", 64)])
def test_compiled_tile_unpack_is_bit_exact(kernels: None, monkeypatch, pattern: str, in_f: int,
                                           dtype: torch.dtype) -> None:
    """The tiled (prefill) path unpacks W_S tiles with numba: the same bits as the torch unpack
    and as the dense-storage layer, over several tiles (8 rows each) and a partial last one."""
    m = make_layer(29, in_f, pattern, 3, True, dtype, density=0.4, seed=in_f)
    p = PackedSparseLowRankLinear.from_module(m)
    p.tile_rows = 8
    compiled = p.sparse_dense()
    x = torch.randn(5, in_f).to(dtype)
    y_compiled = p.forward_tiled(x)
    monkeypatch.setenv(packed_dispatch.NO_KERNELS_ENV, "1")
    assert packed_dispatch.unpack_kernels_for(p) is None
    plain = p.sparse_dense()
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(compiled.view(bits), plain.view(bits))  # bit for bit, signs of zeros included
    assert torch.equal(compiled, m.sparse_weight.detach())
    assert torch.equal(y_compiled, p.forward_tiled(x))


def test_bf16_output_rounding_equals_torch(kernels: None) -> None:
    """The kernels' float32 → bfloat16 store is bit for bit ``Tensor.to(torch.bfloat16)``: ties
    to even both ways, negatives, subnormals, the largest finite values rounding to inf, inf;
    NaN stays NaN (torch's own NaN bits differ between its scalar and vector paths)."""
    import numpy as np
    from numba import njit

    from hasslefree.nn.packed_row_kernels import _store_output

    store = njit(lambda y, out: _store_output(y, out))
    g = torch.Generator().manual_seed(5)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x00008000, 0x00018000,
                         0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    y = torch.cat([ties, torch.randn(4000, generator=g) * 10.0 ** torch.randint(-40, 39, (4000,), generator=g)])
    y = y.reshape(1, -1).contiguous()
    out = torch.empty(y.shape, dtype=torch.bfloat16)
    store(y.numpy(), out.view(torch.int16).numpy())
    assert torch.equal(out.view(torch.int16), y.to(torch.bfloat16).view(torch.int16))
    nans = torch.tensor([[0x7FC00001, 0xFFFFFFFF, 0x7F800001]], dtype=torch.int64).to(torch.int32).view(torch.float32)
    out = torch.empty(nans.shape, dtype=torch.bfloat16)
    store(nans.numpy(), out.view(torch.int16).numpy())
    assert out.isnan().all()
    as_f32 = np.empty(y.shape, dtype=np.float32)
    store(y.numpy(), as_f32)
    assert np.array_equal(as_f32.view(np.int32), y.numpy().view(np.int32))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_one_entry_bf16_output_is_the_float32_sums_rounded_once(kernels: None, monkeypatch, pattern: str) -> None:
    """The one-entry AVX2 kernels write bfloat16 themselves: exactly the float32 result they
    give for the same bf16 layer and inputs, rounded once (so nothing is lost by not
    returning float32 and converting in torch)."""
    from hasslefree.nn import packed_kernels

    if not packed_kernels.HAVE_AVX2:
        pytest.skip("the one-entry kernels are the AVX2 routes; this CPU has no AVX2")
    m = make_layer(45, 64, pattern, 5, True, torch.bfloat16, density=0.4, seed=21)
    p = PackedSparseLowRankLinear.from_module(m)
    kernel = getattr(packed_kernels, "_two_four_kernel" if pattern == "2:4" else "_bitmask_kernel")
    seen = []

    def both(*args):  # run the kernel into float32 too, on the same arguments
        y32 = torch.empty(args[-1].shape, dtype=torch.float32)
        kernel(*args[:-1], y32.numpy())
        seen.append(y32)
        return kernel(*args)

    monkeypatch.setattr(packed_kernels, "_two_four_kernel" if pattern == "2:4" else "_bitmask_kernel", both)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = p.forward_kernel(x)
    assert len(seen) == 1 and y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16), seen[0].to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_decoder_cached_and_rebuilt_on_change(kernels: None, pattern: str) -> None:
    """A decode step reuses the layer's decoder; an in-place change of U or a replaced values
    buffer is noticed, and the outputs follow the new weights."""
    m = make_layer(24, 32, pattern, 3, True, density=0.5, seed=9)
    p = PackedSparseLowRankLinear.from_module(m)
    x = torch.randn(2, 32)
    with torch.no_grad():
        p(x)
        first = packed_dispatch.decoder_for(p, x)
        assert first is not None and packed_dispatch.decoder_for(p, x) is first
        p.U.mul_(2.0)
        m.U.mul_(2.0)
        assert packed_dispatch.decoder_for(p, x) is not first
        assert_close_ref(p(x), m, x)
        second = packed_dispatch.decoder_for(p, x)
        p.values = p.values * 3.0  # a new tensor in the buffer slot
        m.sparse_weight.mul_(3.0)
        assert packed_dispatch.decoder_for(p, x) is not second
        assert_close_ref(p(x), m, x)
        assert packed_dispatch.decoder_for(p, x.double()) is None  # no float64 kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in, rank", [(1, 8), (300, 13), (1000, 64), (515, 5), (257, 0)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_low_rank_input_both_routes_match_float64(kernels: None, dtype: torch.dtype, n_in: int, rank: int,
                                                  tokens: int) -> None:
    """z = x V, serial and blocked-parallel (the blocked route sums rows of V in blocks of
    V_BLOCK): within the float32 bound of float64 on awkward widths and ranks (octets and their
    tail); x wider than n_in (padding) is ignored."""
    from hasslefree.nn.packed_kernels import _np
    from hasslefree.nn.packed_row_kernels import _xv_kernel, _xv_serial

    g = torch.Generator().manual_seed(n_in + rank)
    x = torch.randn(tokens, n_in + 3, generator=g)
    V = torch.randn(n_in, rank, generator=g).to(dtype)
    exact = x[:, :n_in].double() @ V.double()
    bound = (n_in + 2) * 2.0**-24 * (x[:, :n_in].double().abs() @ V.double().abs())
    for route in (_xv_serial, _xv_kernel):
        z = torch.from_numpy(route(x.numpy(), _np(V), n_in))
        assert z.shape == (tokens, rank)
        assert bool(((z.double() - exact).abs() <= bound).all()), route


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["2:4", "3:8", "unstructured"])
@pytest.mark.parametrize("rank", [8, 13, 64])  # the low-rank term in octets, and octets + a tail
def test_kernels_with_ranks_in_octets_match_float64(kernels: None, dtype: torch.dtype, pattern: str, rank: int) -> None:
    m = make_layer(29, 96, pattern, rank, True, dtype, density=0.4, seed=rank)
    p = PackedSparseLowRankLinear.from_module(m)
    for x in inputs(96, dtype, seed=rank):
        assert_close_ref(p.forward_kernel(x), m, x)
