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


def random_prune(w: torch.Tensor, pattern: str, g: torch.Generator) -> torch.Tensor:
    """Random (not magnitude) pruning to ``pattern``, then extra zeros so some groups hold < N."""
    from hasslefree.checkpoint.encoding import parse_pattern

    p = parse_pattern(pattern)
    if p.kind == "nm":
        out_f, in_f = w.shape
        pad = (-in_f) % p.m
        scores = torch.rand(out_f, (in_f + pad) // p.m, p.m, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(p.n, -1).indices, True)
        keep = keep.reshape(out_f, -1)[:, :in_f]
    else:
        keep = torch.rand(w.shape, generator=g) < 0.3
    keep &= torch.rand(w.shape, generator=g) > 0.2  # groups with fewer than N nonzeros
    if w.shape[0] > 2:
        keep[1] = False  # an all-zero row
    w = torch.where(keep, w, torch.zeros_like(w))
    return torch.where(w == 0, torch.zeros_like(w), w)  # no -0.0 (it decodes as +0.0)


def tiny_compressed_llama(dtype: torch.dtype = torch.float32, seed: int = 0, tied: bool = True) -> torch.nn.Module:
    """Tiny random Llama already made of SparseLowRankLinear layers: 2:4 + rank 8 (block 0
    attention, block 1 MLP), unstructured + rank 4 elsewhere, and one rank-0 layer."""
    from hasslefree.nn import SparseLowRankLinear, replace_linear

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      attention_bias=True, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        two_four = ("layers.0.self_attn" in name) or ("layers.1.mlp" in name)
        pattern = "2:4" if two_four else "unstructured"
        rank = 0 if name.endswith("layers.1.mlp.down_proj") else (8 if two_four else 4)
        w = mod.weight.detach().float()
        U = torch.randn(w.shape[0], rank, generator=g) * 0.05
        V = torch.randn(w.shape[1], rank, generator=g) * 0.05
        b = None if mod.bias is None else mod.bias.detach().float() + 0.01
        new = SparseLowRankLinear.from_linear_parts(random_prune(w, pattern, g), U, V, b, pattern=pattern).to(dtype)
        replace_linear(model, name, new)
    return model.eval()
