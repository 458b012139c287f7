"""Checkpoint format: exact codecs, save → load bit-identity, clear errors, size accounting."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hasslefree.checkpoint import (
    CheckpointError,
    ModuleCodec,
    checkpoint_info,
    estimate_compression,
    format_info,
    info_command,
    load_compressed,
    register_codec,
    save_compressed,
)
from hasslefree.sparse_storage import (
    decode_sparse,
    encode_sparse,
    pack_bits,
    parse_layout,
    sparse_tensor_specs,
    unpack_bits,
)
from hasslefree.nn import SparseLowRankLinear, replace_linear
from helpers import random_prune, tiny_compressed_llama, unavailable

SRC = Path(__file__).resolve().parents[2] / "src"


# ----------------------------------------------------------------- helpers
def bits(t: Tensor) -> Tensor:
    """Integer view so comparisons see -0.0, NaN payloads and every mantissa bit."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def logits(model: nn.Module, seed: int = 1) -> Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------- codecs
PATTERNS = ["2:4", "1:4", "2:8", "3:8", "4:8", "unstructured"]
SHAPES = [(7, 13), (1, 8), (33, 100), (5, 3), (16, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_codec_round_trip_bit_exact(pattern: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hash((pattern, str(dtype))) % 2**31)
    for shape in SHAPES:
        w = torch.randn(shape, generator=g) * 3
        w.view(-1)[:3] = torch.tensor([float("inf"), 1e-39, -2.5e-42])[: w.numel()]  # inf, subnormals
        w = random_prune(w.to(dtype), pattern, g)
        enc = encode_sparse(w, pattern)
        nnz = int((w != 0).sum())
        specs = sparse_tensor_specs(pattern, shape, dtype, nnz)
        assert {k: (tuple(v.shape), v.dtype) for k, v in enc.items()} == specs
        dec = decode_sparse(enc, pattern, shape)
        assert dec.dtype == dtype and dec.shape == w.shape
        assert torch.equal(bits(dec), bits(w)), (pattern, dtype, shape)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 8])
def test_bit_packing_layout(nbits: int) -> None:
    """On-disk layout is a little-endian bit stream: code i at stream bits [i·b, (i+1)·b)."""
    codes = torch.randint(0, 2**nbits, (101,), generator=torch.Generator().manual_seed(nbits))
    stream = [(int(c) >> j) & 1 for c in codes for j in range(nbits)]
    stream += [0] * (-len(stream) % 8)
    expect = [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]
    packed = pack_bits(codes, nbits)
    assert packed.tolist() == expect
    assert torch.equal(unpack_bits(packed, nbits, 101), codes)
    assert pack_bits(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11100100]


def test_nm_storage_is_compact() -> None:
    w = random_prune(torch.randn(64, 256), "2:4", torch.Generator().manual_seed(0)).bfloat16()
    enc = encode_sparse(w, "2:4")
    assert enc["values"].numel() == 64 * 128 and enc["indices"].dtype == torch.uint8
    assert enc["indices"].numel() == 64 * 128 * 2 // 8  # 2 bits per kept value
    enc38 = encode_sparse(random_prune(torch.randn(8, 64), "3:8", torch.Generator().manual_seed(0)), "3:8")
    assert enc38["indices"].numel() == math.ceil(8 * 8 * 3 * 3 / 8)  # 3 bits per kept value
    csr = encode_sparse(torch.eye(40000, 3).T.contiguous(), "unstructured")
    assert csr["col_indices"].dtype == torch.int32  # width > 32768 needs int32
    assert encode_sparse(torch.eye(8), "unstructured")["col_indices"].dtype == torch.int16


def test_negative_zero_and_nan() -> None:
    w = torch.tensor([[float("nan"), -0.0, 0.0, 1.0, -0.0, 0.0, 0.0, -3.0]])
    for pattern in ("2:4", "unstructured"):
        dec = decode_sparse(encode_sparse(w, pattern), pattern, (1, 8))
        assert torch.isnan(dec[0, 0]) and dec[0, 3] == 1 and dec[0, 7] == -3
        assert (dec[0, 1:3] == 0).all() and (dec[0, 4:7] == 0).all()


def test_codec_rejects_violations_and_corruption() -> None:
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        encode_sparse(torch.ones(2, 8), "2:4")
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        parse_layout("50%")
    w = random_prune(torch.randn(4, 16), "3:8", torch.Generator().manual_seed(0))
    enc = encode_sparse(w, "3:8")
    enc["indices"] = torch.zeros_like(enc["indices"])  # every position 0: not strictly increasing
    with pytest.raises(ValueError, match="corrupted"):
        decode_sparse(enc, "3:8", (4, 16))


# ----------------------------------------------------------------- save / load
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    model = tiny_compressed_llama(dtype)
    ref = logits(model)
    save_compressed(model, tmp_path, run_config={"method": "hasslefree", "pattern": "2:4", "rank_policy": "fixed:8"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hasslefree_config.json", "model.safetensors"]
    loaded = load_compressed(tmp_path, packed=False)
    assert torch.equal(bits(logits(loaded)), bits(ref))
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLowRankLinear):
            new = loaded.get_submodule(name)
            assert isinstance(new, SparseLowRankLinear) and (new.pattern, new.rank) == (mod.pattern, mod.rank)
            for pname, p in mod.named_parameters():
                assert torch.equal(bits(getattr(new, pname)), bits(p)), (name, pname)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    cfg = json.loads((tmp_path / "hasslefree_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "hasslefree" and cfg["rank_policy"] == "fixed:8"
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert {"torch", "transformers", "hasslefree"} <= set(cfg["versions"])
    assert cfg["hf_config"]["model_type"] == "llama" and len(cfg["layers"]) == 14
    layer = cfg["layers"][0]
    assert {"name", "in_features", "out_features", "pattern", "rank", "stored_bytes"} <= set(layer)


def test_eval_loads_a_bfloat16_checkpoint_in_the_dtype_asked_for(tmp_path: Path, monkeypatch) -> None:
    """`hasslefree eval DIR --dtype float32` scores a bf16-saved model in float32 (exact upcast)."""
    from hasslefree.evaluate import load_any

    monkeypatch.setattr("hasslefree.evaluate._checkpoint_tokenizer", lambda *a: None)  # none saved here
    model = tiny_compressed_llama(torch.bfloat16)
    save_compressed(model, tmp_path, run_config={"method": "hasslefree", "pattern": "2:4", "rank_policy": "fixed:8"})
    loaded, _ = load_any(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLowRankLinear):
            assert torch.equal(loaded.get_submodule(name).sparse_weight, mod.sparse_weight.float())
    as_saved, _ = load_any(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(bits(logits(as_saved)), bits(logits(model)))


def test_mixed_dtypes_kept(tmp_path: Path) -> None:
    model = tiny_compressed_llama(torch.bfloat16)
    model.model.norm.weight.data = torch.rand(64, dtype=torch.float32)
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert loaded.model.norm.weight.dtype == torch.float32
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    assert loaded.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


def test_tokenizer_saved(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    save_compressed(tiny_compressed_llama(), tmp_path, tokenizer=tok)
    cfg = json.loads((tmp_path / "hasslefree_config.json").read_text())
    assert "tokenizer.json" in cfg["tokenizer_files"] and (tmp_path / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


class ScaledLinear(nn.Module):
    """A stand-in for a future compressed layer, to prove the registry needs no format changes."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.weight, self.scale = nn.Parameter(weight), nn.Parameter(scale)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) * self.scale


class ScaledLinearCodec(ModuleCodec):
    kind = "test_scaled_linear"

    def encode(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {"in_features": module.in_features, "out_features": module.out_features, "dtype": "float32"}
        return {"weight": module.weight.detach(), "scale": module.scale.detach()}, meta

    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        return {
            "weight": ((meta["out_features"], meta["in_features"]), torch.float32),
            "scale": ((meta["out_features"],), "float32"),  # a dtype name works too
        }

    def decode(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> nn.Module:
        return ScaledLinear(tensors["weight"], tensors["scale"])

    def analytic_bytes(self, meta: dict[str, Any]) -> float:
        return (meta["out_features"] * meta["in_features"] + meta["out_features"]) * 4


def test_registry_plugs_in_new_module_type(tmp_path: Path) -> None:
    register_codec(ScaledLinear, ScaledLinearCodec())
    model = tiny_compressed_llama()
    old = model.model.layers[1].self_attn.o_proj
    replace_linear(model, "model.layers.1.self_attn.o_proj", ScaledLinear(old.to_dense(), torch.rand(64) + 0.5))
    ref = logits(model)
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, ScaledLinear)
    assert torch.equal(logits(loaded), ref)
    assert any(x["kind"] == "test_scaled_linear" for x in checkpoint_info(tmp_path)["layers"])


def test_stories260k_round_trip(tmp_path: Path) -> None:
    """The real tiny model (llama2.c weights via the project loader) saves and loads bit-identically."""
    from hasslefree.loading import load_model

    try:
        model, tok = load_model("stories260K")
    except OSError as exc:  # a missing data folder
        unavailable(f"stories260K unavailable: {exc}")
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            w = mod.weight.detach()
            U, V = torch.randn(w.shape[0], 4, generator=g) * 0.01, torch.randn(w.shape[1], 4, generator=g) * 0.01
            new = SparseLowRankLinear.from_linear_parts(random_prune(w, "2:4", g), U, V, pattern="2:4")
            replace_linear(model, name, new)
    save_compressed(model, tmp_path, {"method": "test"}, tokenizer=tok)
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path, packed=False)(ids).logits, model(ids).logits)


# ----------------------------------------------------------------- errors
@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    save_compressed(tiny_compressed_llama(), tmp_path)
    return tmp_path


def _edit_config(directory: Path, edit: Any) -> None:
    path = directory / "hasslefree_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_truncated_weights(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for fn in (load_compressed, checkpoint_info):
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            fn(saved)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_compressed(saved)
    path.write_bytes(data + b"trailing")  # passes our header check; safetensors' own error is wrapped
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not fully covered"):
        load_compressed(saved)


def test_corrupted_header(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"#garbage-header!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*corrupted"):
        load_compressed(saved)
    data[:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_compressed(saved)


def test_missing_files(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_compressed(saved)
    (saved / "hasslefree_config.json").unlink()
    with pytest.raises(CheckpointError, match="hasslefree_config.json.*missing"):
        load_compressed(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("hf_config"), "missing required field.*hf_config"),
        (lambda c: c["layers"][3].pop("rank"), "layer 'model.layers.0.self_attn.o_proj'.*rank"),
        (lambda c: c["layers"][0].pop("kind"), "layer #0 is missing required field 'kind'"),
        (lambda c: c.update(format_version=99), "unsupported format version 99"),
        (lambda c: c["layers"][0].update(kind="nope"), "unknown kind"),
    ],
)
def test_bad_config(saved: Path, edit: Any, message: str) -> None:
    _edit_config(saved, edit)
    with pytest.raises(CheckpointError, match=re.escape(str(saved / "hasslefree_config.json")) + ".*" + message):
        load_compressed(saved)


def test_shape_mismatch(saved: Path) -> None:
    _edit_config(saved, lambda c: c["layers"][0].update(rank=9))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model.layers.0.self_attn.q_proj.U'.*\[64, 8\]"):
        load_compressed(saved)


def test_shape_mismatch_against_model_config(saved: Path) -> None:
    _edit_config(saved, lambda c: c["hf_config"].update(intermediate_size=176))
    with pytest.raises(CheckpointError, match=r"hasslefree_config\.json.*gate_proj"):
        load_compressed(saved)


def test_no_unsafe_torch_load_in_src() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end() : match.end() + 400].split(")\n")[0]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path}:{text[: match.start()].count(chr(10)) + 1}")
        if re.search(r"^\s*(import pickle|from pickle)", text, re.M) and "checkpoint" in path.parts:
            offenders.append(f"{path}: imports pickle")
    assert not offenders, offenders


# ----------------------------------------------------------------- size accounting
def test_info_analytic_matches_measured(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = checkpoint_info(saved)
    for layer in info["layers"]:
        assert layer["analytic_bytes"] == pytest.approx(layer["measured_bytes"], rel=0.01), layer["name"]
    assert info["totals"]["analytic_over_measured"] == pytest.approx(1.0, rel=0.01)
    assert "TOTAL" in format_info(info)
    assert info_command(str(saved)) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    assert info_command(str(saved / "nowhere")) == 1


LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def test_llama3_8b_shapes_ratio() -> None:
    est = estimate_compression(LLAMA3_8B, "2:4", 64, torch.bfloat16)
    for name, (o, i) in LLAMA3_8B.items():  # independent arithmetic: values + 2-bit indices + U, V
        expect = (o * i // 2) * 2 + (o * i // 2) * 2 / 8 + (o + i) * 64 * 2
        assert est["layers"][name]["analytic_bytes"] == pytest.approx(expect)
    assert est["ratio"] <= 0.62


def test_scaled_down_measured_ratio(tmp_path: Path) -> None:
    """Same shape ratios as Llama-3-8B at 1/32 scale: measured bytes match the analytic count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=448,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().float()
            U, V = torch.randn(w.shape[0], 2, generator=g), torch.randn(w.shape[1], 2, generator=g)
            new = SparseLowRankLinear.from_linear_parts(random_prune(w, "2:4", g), U, V, pattern="2:4")
            replace_linear(model, name, new.to(torch.bfloat16))
    save_compressed(model, tmp_path)
    info = checkpoint_info(tmp_path)
    shapes = {x["name"]: tuple(x["shape"]) for x in info["layers"]}
    est = estimate_compression(shapes, "2:4", 2, torch.bfloat16)
    assert info["totals"]["measured_bytes"] == pytest.approx(est["analytic_bytes"], rel=0.01)
    assert info["totals"]["ratio"] == pytest.approx(est["ratio"], rel=0.01)


def test_codec_rejects_repeated_csr_entries_and_n_equal_m() -> None:
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    enc = encode_sparse(w, "unstructured")
    enc["col_indices"] = torch.tensor([1, 1, 0, 3], dtype=enc["col_indices"].dtype)  # (0, 1) twice
    with pytest.raises(ValueError, match="repeated or unsorted"):
        decode_sparse(enc, "unstructured", (2, 4))
    enc["col_indices"] = torch.tensor([2, 1, 0, 3], dtype=enc["col_indices"].dtype)  # unsorted in row 0
    with pytest.raises(ValueError, match="repeated or unsorted"):
        decode_sparse(enc, "unstructured", (2, 4))
    for pattern in ("4:4", "1:1", "3:2"):
        with pytest.raises(ValueError, match="N < M"):
            parse_layout(pattern)


@pytest.mark.parametrize("entry", ["../outside.json", "/etc/passwd", "sub/tokenizer.json", "..", ""])
def test_file_names_in_the_config_cannot_leave_the_folder(saved: Path, entry: str) -> None:
    config = json.loads((saved / "hasslefree_config.json").read_text())
    config["tokenizer_files"] = ["tokenizer.json", entry]
    (saved / "hasslefree_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_compressed(saved)
    from hasslefree.checkpoint import export_dense

    with pytest.raises(CheckpointError, match="not a plain file name"):
        export_dense(saved, saved.parent / "exported")


@pytest.mark.parametrize("source", ["../elsewhere/model.bin", "/tmp/evil.gguf", "someone/some-model"])
def test_eval_never_loads_a_model_named_inside_an_untrusted_checkpoint(tmp_path: Path, monkeypatch, source) -> None:
    """run_config.model comes from the checkpoint file: it is not a licence to read other paths."""
    from hasslefree import evaluate

    save_compressed(tiny_compressed_llama(), tmp_path, run_config={"method": "hasslefree", "model": source})

    def refuse(*_a, **_k):
        raise AssertionError("a model named by the checkpoint was loaded")

    monkeypatch.setattr("hasslefree.loading.load_model", refuse)
    monkeypatch.setattr("hasslefree.loading.llama2c.load_llama2c_tokenizer", refuse)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        evaluate.load_any(tmp_path)
