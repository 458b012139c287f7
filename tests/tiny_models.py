"""Tiny random causal LMs of every registered family (hidden 64, 2 blocks, vocab 128)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128
_COMMON = dict(num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)
_ROPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **_COMMON)

# family -> (config class name, kwargs, registry entry expected)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", _ROPE, "llama"),
    "mistral": ("MistralConfig", {**_ROPE, "sliding_window": 8}, "mistral"),
    "qwen2": ("Qwen2Config", _ROPE, "qwen2"),
    "qwen3": ("Qwen3Config", {**_ROPE, "head_dim": 16}, "qwen3"),
    "gemma": ("GemmaConfig", {**_ROPE, "head_dim": 16}, "gemma"),
    "gemma2": ("Gemma2Config", {**_ROPE, "head_dim": 16, "sliding_window": 8}, "gemma2"),
    "gemma3": ("Gemma3TextConfig", {**_ROPE, "head_dim": 16, "sliding_window": 8}, "gemma3"),
    "phi3": ("Phi3Config", {**_ROPE, "pad_token_id": 0}, "phi3"),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                              **_COMMON), "opt"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256), "gpt2"),
}


def tiny_model(family: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A random model of ``family`` in eval mode; skips the test when transformers lacks it."""
    class_name, kwargs, _ = FAMILIES[family]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    config = config_class(**{**kwargs, **changes})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_llama(seed: int = 0, **changes) -> torch.nn.Module:
    return tiny_model("llama", seed, **changes)


def token_batch(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
