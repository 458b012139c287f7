"""Shared test helpers: tiny random causal LMs of every registered family (hidden 64, 2 blocks,
vocab 128), small layer problems, the real stories260K data, and what to do when shared data
or an optional package is missing (skip locally; fail where ``HASSLEFREE_REQUIRE_DATA=1``, as
in CI)."""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest
import torch
import transformers
from torch import Tensor

from hasslefree.nn import SparseLowRankLinear, replace_linear

REQUIRE_ENV = "HASSLEFREE_REQUIRE_DATA"


def required() -> bool:
    """Whether missing shared data or optional packages must fail the tests (CI) instead of skipping them."""
    return os.environ.get(REQUIRE_ENV) == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the running test for a missing resource, or fail it where resources are required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the resource is required here)", pytrace=False)
    pytest.skip(reason)


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """A marker for tests that need a resource: skip without it, or fail where it is required
    (``conftest.py`` turns the ``missing`` marker into a failure)."""
    if available:
        return pytest.mark.needs_ok
    return pytest.mark.missing(reason) if required() else pytest.mark.skip(reason=reason)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def stories_text() -> str:
    """The stories260K text file of the shared data folder (the model's tokenizer must exist too)."""
    from hasslefree.loading import find_data_file, resolve_alias

    try:
        resolve_alias("stories260K")
        return str(find_data_file("text", "tinystories.validation-head.txt"))
    except FileNotFoundError as exc:
        unavailable(str(exc))


def correlated_problem(out_features: int, in_features: int, tokens: int = 400, seed: int = 0,
                       dtype: torch.dtype = torch.float64):
    """A weight and the Hessian of correlated, unevenly scaled inputs (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen, dtype=dtype) * 0.3 + torch.eye(in_features, dtype=dtype)
    scales = torch.rand(in_features, generator=gen, dtype=dtype) * 3 + 0.1
    x = (torch.randn(tokens, in_features, generator=gen, dtype=dtype) @ mix) * scales
    weight = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    return weight, x.T @ x / tokens


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
    from hasslefree.sparse_storage import parse_layout

    p = parse_layout(pattern)
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


def make_layer(out_f: int, in_f: int, pattern: str, rank: int, bias: bool, dtype: torch.dtype = torch.float32,
               density: float = 0.3, seed: int = 0) -> SparseLowRankLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if pattern == "unstructured":
        w = torch.where(torch.rand(out_f, in_f, generator=g) < density, w, torch.zeros(()))
    elif pattern != "dense":
        w = random_prune(w, pattern, g)  # includes groups with fewer than N nonzeros and an all-zero row
    U = torch.randn(out_f, rank, generator=g) * 0.3
    V = torch.randn(in_f, rank, generator=g) * 0.3
    b = torch.randn(out_f, generator=g) if bias else None
    return SparseLowRankLinear.from_linear_parts(w, U, V, b, pattern=pattern).to(dtype)


def reference(m: SparseLowRankLinear, x: Tensor) -> tuple[Tensor, Tensor]:
    """(y, magnitude) in float64: y = x (W_S + U Vᵀ)ᵀ + b from the layer's exact values, and
    |x| |W_S|ᵀ + (|x| |V|) |U|ᵀ + |b|, the scale that every rounding error is relative to."""
    xd, w, U, V = x.double(), m.sparse_weight.double(), m.U.double(), m.V.double()
    b = m.bias.double() if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
    y = xd @ (w + U @ V.T).T + b
    mag = xd.abs() @ w.abs().T + (xd.abs() @ V.abs()) @ U.abs().T + b.abs()
    return y, mag


class Interrupt(Exception):
    """Stands for a run killed after some block."""


def compress_interrupted(directory, *, after_block: int, blocks: int = 3, **options):
    """Start ``compress`` on a fresh tiny Llama of ``blocks`` blocks in ``directory`` and stop it
    once block ``after_block`` is checkpointed, as a killed run would be."""
    from hasslefree.pipeline import compress

    def stop(index, _records):
        if index == after_block:
            raise Interrupt

    with pytest.raises(Interrupt):
        compress(tiny_llama(num_hidden_layers=blocks), out_dir=directory, on_block_end=stop, **options)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
