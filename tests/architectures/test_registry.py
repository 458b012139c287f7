"""Architecture registry: every family resolves, matches discovery, and compresses end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hasslefree.nn import SparseLowRankLinear
from hasslefree.patterns import SparsityPattern
from hasslefree.pipeline import compress, lookup, resolve_architecture
from hasslefree.architectures.discover import discover_architecture, find_groups
from hasslefree.architectures.registry import LLAMA
from helpers import FAMILIES, tiny_model, token_batch

torch.set_num_threads(1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_registry_entry_matches_model_and_discovery(family):
    model = tiny_model(family)
    arch = resolve_architecture(model)
    assert arch.name == FAMILIES[family][2]
    blocks = arch.block_list(model)
    assert len(blocks) == 2
    # The declared groups are exactly the layers that really share an input, in call order.
    assert find_groups(model, blocks[0]) == arch.groups


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_compresses_end_to_end(family):
    ids = token_batch(4, 32)
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(ids).logits
    # Lossless settings: the pipeline itself (capture, per-block kwargs, swap-in) must be exact.
    compress(model, calibration=ids, pattern="dense", method="sparsegpt", progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)

    model = tiny_model(family)
    report = compress(model, calibration=ids, pattern="2:4", rank=4, method="hassle-free-exact",
                      iterations=2, progress=False)
    arch = resolve_architecture(model)
    blocks = arch.block_list(model)
    assert len(report.layers) == len(blocks) * len(arch.layer_names)
    pattern = SparsityPattern.parse("2:4")
    for block in blocks:
        for name in arch.layer_names:
            module = block.get_submodule(name)
            assert isinstance(module, SparseLowRankLinear)
            assert pattern.is_satisfied_by(module.sparse_weight != 0)
            assert module.U.shape == (module.out_features, 4) and module.V.shape == (module.in_features, 4)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_clones_inherit_groups():
    for name in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
        assert lookup(name).groups == LLAMA.groups and lookup(name).blocks == "model.layers"
    assert lookup("unknown-model-type") is None


def test_discovery_handles_an_unregistered_family():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GPTNeoXConfig"):
        pytest.skip("no GPTNeoXConfig in this transformers")
    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    arch = resolve_architecture(model)
    assert arch.name.startswith("discovered")
    assert arch.blocks == "gpt_neox.layers"
    # Parallel residual: attention and MLP read different layer norms, even when those are
    # equal at initialisation, so they must not merge into one group.
    assert arch.groups == (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                           ("mlp.dense_4h_to_h",))
    ids = token_batch(2, 16)
    with torch.no_grad():
        reference = model(ids).logits
    compress(model, calibration=ids, pattern="dense", method="sparsegpt", progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_discovery_fails_clearly_without_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        discover_architecture(model)


def test_registry_entry_that_does_not_fit_is_reported():
    model = tiny_model("llama")
    model.config.model_type = "phi3"  # claims Phi-3 but has separate q/k/v
    with pytest.raises(ValueError, match="lacks self_attn.qkv_proj"):
        resolve_architecture(model)
