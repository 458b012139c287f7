"""PackedSparseLowRankLinear: exact conversions, every forward path against a float64 reference,
packed loading from checkpoints, clear errors on corrupt tensors, and ``hasslefree generate``."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from hasslefree.checkpoint import CheckpointError, load_compressed, save_compressed
from hasslefree.sparse_storage import encode_sparse
from hasslefree.checkpoint.linear_codec import packed_from_encoded
from hasslefree.nn import PackedSparseLowRankLinear, SparseLowRankLinear, pack_model, unpack_model
from helpers import VOCAB, make_layer, reference, tiny_compressed_llama

torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[2] / "src"
NM_PATTERNS = ["1:4", "2:4", "4:8", "2:8", "3:8", "1:2", "2:6"]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
BATCHES = [(1,), (3,), (2, 5)]  # 1 and 3 tokens take the gather path of N:M layers, 10 the tiled one


# ----------------------------------------------------------------- helpers
def bits(t: Tensor) -> Tensor:
    """Integer view so comparisons see -0.0 and every mantissa bit."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(a: Tensor, b: Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def check_close(got: Tensor, m: SparseLowRankLinear, x: Tensor) -> None:
    y, mag = reference(m, x)
    assert got.shape == y.shape and got.dtype == x.dtype
    if x.dtype == torch.float32:
        # Rounding-error bound of float32 dot products, |err| <= n·u·Σ|a·b| with u = 2^-24 and
        # n the number of products and sums (in + rank + a few): tight, and it never flakes.
        tol = (m.in_features + m.rank + 4) * 2.0**-24 * mag
    else:
        # bfloat16 keeps 8 significant bits (unit roundoff u = 2^-9). Products are accumulated
        # in float32, so the error comes from at most ~5 roundings to bf16 (W_S product,
        # x V, (x V) Uᵀ, the sum, the bias), each <= u times the magnitude: 8·u leaves margin.
        tol = 8 * 2.0**-9 * mag
    err = (got.double() - y).abs()
    assert bool((err <= tol + 1e-30).all()), f"max error {err.max():.3e}, worst ratio {(err / (tol + 1e-30)).max():.2f}"


def paths(p: PackedSparseLowRankLinear, x: Tensor) -> dict[str, Tensor]:
    """Every forward path on x, for the default tile and for 8-row tiles (several per layer)."""
    x2d = x.reshape(-1, p.in_features)
    shape = (*x.shape[:-1], p.out_features)
    out = {}
    for tile in (512, 8):
        p.tile_rows = tile
        out[f"auto/{tile}"] = p(x)
        out[f"tiled/{tile}"] = p.forward_tiled(x2d).view(shape)
        if p.kind == "nm":
            out[f"gather/{tile}"] = p.forward_gather(x2d).view(shape)
    p.tile_rows = PackedSparseLowRankLinear.tile_rows
    return out


# ----------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("in_f", [56, 50])  # 50: a partial last group (zero padding) for M = 4, 6, 8
@pytest.mark.parametrize("pattern", NM_PATTERNS)
def test_nm_forward_paths_match_float64(pattern: str, in_f: int, rank: int, bias: bool, dtype: torch.dtype) -> None:
    m = make_layer(37, in_f, pattern, rank, bias, dtype, seed=in_f + rank)
    p = PackedSparseLowRankLinear.from_module(m)
    g = torch.Generator().manual_seed(1)
    for batch in BATCHES:
        x = torch.randn(*batch, in_f, generator=g).to(dtype)
        for y in paths(p, x).values():
            check_close(y, m, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("density", DENSITIES)
def test_unstructured_forward_matches_float64(density: float, rank: int, bias: bool, dtype: torch.dtype) -> None:
    m = make_layer(37, 53, "unstructured", rank, bias, dtype, density=density, seed=int(density * 10) + rank)
    p = PackedSparseLowRankLinear.from_module(m)
    assert p.values.numel() == int((m.sparse_weight != 0).sum())
    g = torch.Generator().manual_seed(2)
    for batch in BATCHES:
        x = torch.randn(*batch, 53, generator=g).to(dtype)
        for y in paths(p, x).values():
            check_close(y, m, x)


def test_dense_pattern_forward() -> None:
    m = make_layer(19, 23, "dense", 3, True)
    p = PackedSparseLowRankLinear.from_module(m)
    x = torch.randn(2, 5, 23)
    for y in paths(p, x).values():
        check_close(y, m, x)


def test_single_tile_is_bit_identical_to_dense_storage() -> None:
    """With one tile and no padding the packed layer runs exactly SparseLowRankLinear's ops."""
    m = make_layer(37, 56, "2:4", 5, True)
    p = PackedSparseLowRankLinear.from_module(m)
    x = torch.randn(2, 5, 56)
    with torch.no_grad():
        assert_same_bits(p(x), m(x))


def test_forward_rejects_wrong_width() -> None:
    p = PackedSparseLowRankLinear.from_module(make_layer(8, 16, "2:4", 2, False))
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        p(torch.randn(3, 15))


def test_gradients_reach_low_rank_and_bias() -> None:
    p = PackedSparseLowRankLinear.from_module(make_layer(9, 16, "2:4", 2, True))
    for x in (torch.randn(2, 16), torch.randn(12, 16)):  # gather and tiled paths
        p.zero_grad()
        p(x).sum().backward()
        assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in (p.U, p.V, p.bias))


# ----------------------------------------------------------------- conversions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [*NM_PATTERNS, "unstructured", "dense"])
def test_round_trip_bit_exact(pattern: str, dtype: torch.dtype) -> None:
    for shape, rank, bias in (((37, 50), 4, True), ((8, 16), 0, False), ((1, 8), 1, True)):
        m = make_layer(*shape, pattern, rank, bias, dtype)
        p = PackedSparseLowRankLinear.from_module(m)
        back = p.to_module()
        assert isinstance(back, SparseLowRankLinear) and back.pattern == m.pattern
        assert (back.in_features, back.out_features, back.rank) == (m.in_features, m.out_features, m.rank)
        for name in ("sparse_weight", "U", "V"):
            assert_same_bits(getattr(back, name), getattr(m, name))
        assert (back.bias is None) == (m.bias is None)
        if m.bias is not None:
            assert_same_bits(back.bias, m.bias)
        assert_same_bits(p.sparse_dense(), m.sparse_weight)
        assert_same_bits(p.to_dense(), m.to_dense())


def test_negative_zero_is_normalised() -> None:
    m = make_layer(8, 16, "2:4", 2, False)
    with torch.no_grad():
        m.sparse_weight[m.sparse_weight == 0] = -0.0
    assert bool(torch.signbit(m.sparse_weight).any())
    for pattern in ("2:4", "unstructured"):
        m.pattern = pattern
        back = PackedSparseLowRankLinear.from_module(m).to_module()
        expected = torch.where(m.sparse_weight == 0, torch.zeros(()), m.sparse_weight)
        assert_same_bits(back.sparse_weight, expected)


def test_from_module_rejects_pattern_violation() -> None:
    m = make_layer(8, 16, "unstructured", 2, False, density=1.0)
    m.pattern = "2:4"
    with pytest.raises(ValueError, match="layer 'blk.q'.*not a 2:4"):
        PackedSparseLowRankLinear.from_module(m, name="blk.q")


def _expected_bytes(pattern: str, out_f: int, in_f: int, nnz: int, value_bytes: int = 2) -> int:
    if pattern == "unstructured":
        return nnz * value_bytes + out_f * math.ceil(in_f / 8)
    n, m = map(int, pattern.split(":"))
    kept = out_f * math.ceil(in_f / m) * n
    return kept * value_bytes + math.ceil(kept * math.ceil(math.log2(m)) / 8)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "2:8", "unstructured"])
def test_stored_bytes_below_dense_bf16(pattern: str) -> None:
    out_f, in_f = 64, 256
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    if pattern == "unstructured":  # exactly 50 % density
        keep = torch.rand(out_f, in_f, generator=g).argsort(dim=1) < in_f // 2
    else:
        n, mm = map(int, pattern.split(":"))
        scores = torch.rand(out_f, in_f // mm, mm, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, -1).indices, True)
        keep = keep.view(out_f, in_f)
    w = torch.where(keep, w, torch.zeros(()))
    m = SparseLowRankLinear.from_linear_parts(w, None, None, pattern=pattern).to(torch.bfloat16)
    p = PackedSparseLowRankLinear.from_module(m)
    dense_bf16 = out_f * in_f * 2
    assert p.stored_bytes() == _expected_bytes(pattern, out_f, in_f, int(keep.sum()))
    assert p.stored_bytes() < dense_bf16
    per_weight = {"2:4": 1.125 / 2, "4:8": 1.1875 / 2, "2:8": 0.59375 / 2, "unstructured": 1.125 / 2}[pattern]
    assert p.stored_bytes() == dense_bf16 * per_weight


# ----------------------------------------------------------------- whole models
def _ids(seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _forward(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(ids).logits


def _greedy(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_tiny_llama_packed_matches_dense_storage() -> None:
    model = tiny_compressed_llama()
    packed = pack_model(copy.deepcopy(model), tile_rows=16)  # the 172-wide MLP layers take several tiles
    n_layers = _count(model, SparseLowRankLinear)
    assert _count(packed, PackedSparseLowRankLinear) == n_layers and _count(packed, SparseLowRankLinear) == 0
    ids = _ids()
    torch.testing.assert_close(_forward(packed, ids), _forward(model, ids), rtol=1e-5, atol=1e-5)
    for prompt in (ids[:1, :4], ids):  # 4 tokens: decode steps take the gather path; 2 x 12 the tiled one
        assert torch.equal(_greedy(packed, prompt), _greedy(model, prompt))
    unpack_model(packed)
    assert _count(packed, SparseLowRankLinear) == n_layers
    assert torch.equal(_forward(packed, ids), _forward(model, ids))


def test_tiny_llama_bf16_packed_close() -> None:
    model = tiny_compressed_llama(torch.bfloat16)
    packed = pack_model(copy.deepcopy(model), tile_rows=16)
    ids = _ids()
    # bf16 roundings differ between the tiled/gathered and the one-shot products; through two
    # blocks they stay within a few bf16 ulps of logits of size ~1.
    torch.testing.assert_close(_forward(packed, ids).float(), _forward(model, ids).float(), rtol=0.05, atol=0.05)


def test_packed_model_memory_is_smaller() -> None:
    model = tiny_compressed_llama(torch.bfloat16)
    dense_storage = sum(m.sparse_weight.numel() * 2 for m in model.modules() if isinstance(m, SparseLowRankLinear))
    pack_model(model)
    sparse_bytes = sum(b.numel() * b.element_size() for m in model.modules()
                       if isinstance(m, PackedSparseLowRankLinear) for b in m.buffers())
    assert sparse_bytes < 0.65 * dense_storage


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = tiny_compressed_llama(tied=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_compressed(model, path)
    return path, model


def test_load_compressed_packed(saved: tuple[Path, nn.Module]) -> None:
    path, model = saved
    plain = load_compressed(path, packed=False)
    packed = load_compressed(path, packed=True)
    assert _count(load_compressed(path), PackedSparseLowRankLinear) == _count(packed, PackedSparseLowRankLinear)
    assert _count(packed, SparseLowRankLinear) == 0
    assert _count(packed, PackedSparseLowRankLinear) == _count(plain, SparseLowRankLinear) > 0
    for name, mod in packed.named_modules():
        if isinstance(mod, PackedSparseLowRankLinear):
            ref = plain.get_submodule(name)
            direct = PackedSparseLowRankLinear.from_module(ref)  # built from the dense storage
            for key, buf in direct.named_buffers():
                assert_same_bits(dict(mod.named_buffers())[key], buf)
            back = mod.to_module()
            for attr in ("sparse_weight", "U", "V"):
                assert_same_bits(getattr(back, attr), getattr(ref, attr))
    ids = _ids()
    assert torch.equal(_forward(plain, ids), _forward(model, ids))
    torch.testing.assert_close(_forward(packed, ids), _forward(plain, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(packed, ids[:1, :5]), _greedy(plain, ids[:1, :5]))


# ----------------------------------------------------------------- corrupt tensors
def _encoded(m: SparseLowRankLinear) -> tuple[dict[str, Tensor], dict]:
    from hasslefree.checkpoint.linear_codec import SparseLowRankLinearCodec

    tensors, meta = SparseLowRankLinearCodec().encode(m)
    return {k: v.clone() for k, v in tensors.items()}, meta


def test_from_encoded_matches_from_module() -> None:
    for pattern in ("2:4", "3:8", "unstructured", "dense"):
        m = make_layer(37, 50, pattern, 3, True)
        tensors, meta = _encoded(m)
        a = packed_from_encoded(tensors, meta, name="x")
        b = PackedSparseLowRankLinear.from_module(m)
        assert [k for k, _ in a.named_buffers()] == [k for k, _ in b.named_buffers()]
        for (_, ta), (_, tb) in zip(a.named_buffers(), b.named_buffers()):
            assert_same_bits(ta, tb)


CORRUPTIONS = {
    "2:4 positions not increasing": ("2:4", lambda t: t["sparse.indices"].fill_(0x55), "not strictly increasing"),
    "2:6 position out of range": ("2:6", lambda t: t["sparse.indices"].fill_(0xFF), "out of range"),
    "2:4 values wrong shape": ("2:4", lambda t: t.update({"sparse.values": t["sparse.values"][:, 1:]}), "values must"),
    "2:4 values wrong dtype": ("2:4", lambda t: t.update({"sparse.values": t["sparse.values"].half()}), "float32"),
    "2:4 indices too short": ("2:4", lambda t: t.update({"sparse.indices": t["sparse.indices"][1:]}), "indices must"),
    "U wrong shape": ("2:4", lambda t: t.update({"U": t["U"][1:]}), "U must"),
    "csr pointers": ("unstructured", lambda t: t["sparse.row_ptr"].__setitem__(-1, 0), "row pointers"),
    "csr columns": ("unstructured", lambda t: t["sparse.col_indices"].fill_(3), "column indices"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_from_encoded_rejects_corruption(case: str) -> None:
    pattern, corrupt, message = CORRUPTIONS[case]
    tensors, meta = _encoded(make_layer(16, 24, pattern, 2, False, density=0.5))
    corrupt(tensors)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.3\.mlp\.up_proj': .*" + message):
        packed_from_encoded(tensors, meta, name="model.layers.3.mlp.up_proj")


def test_nonzero_in_padding_rejected() -> None:
    m = make_layer(8, 6, "3:4", 0, False)  # groups of cols 0-3 and 4-5 (+2 padding columns)
    with torch.no_grad():
        m.sparse_weight.copy_(torch.tensor([1.0, 0, 0, 0, 2.0, 3.0]).expand(8, 6))
    packed = encode_sparse(m.sparse_weight, "3:4")  # the filler of the last group sits at padding column 6
    packed["values"][:, -1] = 5.0
    with pytest.raises(ValueError, match="layer 'pad'.*padding"):
        PackedSparseLowRankLinear(6, 8, "3:4", packed, m.U, m.V, name="pad")


def test_bitmask_popcount_must_match_values() -> None:
    m = make_layer(8, 13, "unstructured", 1, False, density=0.5)
    p = PackedSparseLowRankLinear.from_module(m)
    extra = p.mask.clone()
    extra[0, 0] = 0xFF
    with pytest.raises(ValueError, match="layer 'u': mask marks .* but .* values"):
        PackedSparseLowRankLinear(13, 8, "unstructured", {"mask": extra, "values": p.values}, p.U, p.V, name="u")
    past_end = p.mask.clone()
    past_end[0, -1] |= 0x80  # column 15 of a 13-wide layer
    with pytest.raises(ValueError, match="layer 'u': mask has bits set past the last column"):
        PackedSparseLowRankLinear(13, 8, "unstructured", {"mask": past_end, "values": p.values}, p.U, p.V, name="u")


def test_load_packed_rejects_corrupt_tensor(saved: tuple[Path, nn.Module], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.sparse.indices"  # a 2:4 layer
    tensors[key] = torch.full_like(tensors[key], 0x55)  # same shape and dtype, positions (1, 1)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*strictly increasing"):
        load_compressed(broken, packed=True)


# ----------------------------------------------------------------- imports and CLI
@pytest.mark.parametrize("first", ["hasslefree.nn", "hasslefree.checkpoint"])
def test_import_order_has_no_cycle(first: str) -> None:
    code = (f"import {first}; from hasslefree.nn import PackedSparseLowRankLinear; "
            "from hasslefree.checkpoint import load_compressed; PackedSparseLowRankLinear.tile_rows")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, "w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_compressed(tiny_compressed_llama(tied=False), path, tokenizer=PreTrainedTokenizerFast(tokenizer_object=words))
    return path


def test_cli_generate(with_tokenizer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hasslefree.cli import main

    outputs = []
    for flag in ("--packed", "--no-packed"):
        code = main(["generate", str(with_tokenizer), "--prompt", "w5 w9 w17", "--max-new-tokens", "6", flag, "-q"])
        out = capsys.readouterr().out.strip()
        assert code == 0
        assert out.startswith("w5 w9 w17 ") and len(out.split()) == 9
        outputs.append(out)
    assert outputs[0] == outputs[1]  # greedy: the packed layers pick the same tokens


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
])
def test_cli_generate_bad_input(with_tokenizer: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                message: str) -> None:
    from hasslefree.cli import main

    args = ["generate", str(with_tokenizer), "--prompt", "w1", *argv, "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hasslefree: error: ") and message in err[-1]


def test_cli_generate_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hasslefree.cli import main

    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hello", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hasslefree: error: ")
