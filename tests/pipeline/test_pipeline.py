"""The sequential pipeline on tiny random models and on stories260K."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hasslefree.nn import SparseLowRankLinear
from hasslefree.patterns import SparsityPattern
from hasslefree.pipeline import ResumeMismatch, compress, resolve_architecture
from hasslefree.pipeline.capture import capture_block_inputs, run_block
from hasslefree.rank_policy import RankPolicy
from hasslefree import checkpoint
from helpers import assert_same_state, compress_interrupted, stories_text, tiny_llama, tiny_model, token_batch

torch.set_num_threads(1)

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _layers(model):
    for block in model.model.layers:
        for name in LAYERS:
            yield name, block.get_submodule(name)


def test_every_layer_gets_the_requested_pattern_and_rank():
    model = tiny_llama()
    report = compress(model, calibration=token_batch(), pattern="2:4", rank=8, method="hassle-free-exact",
                      iterations=3, progress=False)
    assert len(report.layers) == 14
    pattern = SparsityPattern.parse("2:4")
    for _, module in _layers(model):
        assert isinstance(module, SparseLowRankLinear)
        assert pattern.is_satisfied_by(module.sparse_weight != 0)
        assert module.U.shape == (module.out_features, 8) and module.V.shape == (module.in_features, 8)
    for record in report.layers:
        assert record.rank == 8 and record.pattern == "2:4" and record.iterations == 3
        assert 0 < record.relative_objective <= record.first_iterate_relative_objective < 1
        assert 0 < record.damped_relative_objective < 1
        assert record.parameters == record.dense_parameters // 2 + 8 * sum(record.shape)
    assert report.timings["decompose"] > 0 and report.timings["total"] >= report.timings["decompose"]


def test_lossless_settings_reproduce_the_model():
    ids = token_batch()
    model = tiny_llama()
    with torch.no_grad():
        reference = model(ids).logits
    report = compress(model, calibration=ids, pattern="dense", method="sparsegpt", progress=False)
    assert all(r.rank == 0 for r in report.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_captured_inputs_replay_every_block_exactly(family):
    """Block-0 inputs equal the model's own; each block replayed with its recorded call gives
    the next hidden states (Gemma 2 mixes sliding-window and global blocks)."""
    model = tiny_model(family)
    ids = token_batch(2, 32)
    blocks = resolve_architecture(model).block_list(model)
    inputs = capture_block_inputs(model, blocks, ids, batch_size=2, device=torch.device("cpu"),
                                  dtype=torch.float32)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        assert torch.equal(inputs.hidden[0], states[0])
        hidden = inputs.hidden[0]
        for index, block in enumerate(blocks[:-1]):  # the last hidden state has the final norm applied
            hidden = run_block(block, hidden, inputs.call(index, 2), torch.device("cpu"), torch.float32)
            assert torch.equal(hidden, states[index + 1])


MIXED_ATTENTION = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_every_block_of_a_mixed_attention_model_replays_its_own_call(family):
    """Five blocks mixing sliding-window (8) and global attention over 32-token windows: the
    input captured for EVERY block, and the last block's output, equal a plain forward pass.
    (Sliding and global blocks get different masks and, in Gemma 3, different rotary tables:
    replaying one block's call for another changes the hidden states.)"""
    model = tiny_model(family, num_hidden_layers=5, layer_types=MIXED_ATTENTION)
    ids = token_batch(2, 32)
    blocks = resolve_architecture(model).block_list(model)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True) for b in blocks]
    last: list[torch.Tensor] = []
    hooks.append(blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(
        (out[0] if isinstance(out, tuple) else out).clone())))
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    inputs = capture_block_inputs(model, blocks, ids, batch_size=2, device=torch.device("cpu"),
                                  dtype=torch.float32)
    hidden = inputs.hidden[0]
    with torch.no_grad():
        for index, block in enumerate(blocks):
            torch.testing.assert_close(hidden, seen[index], rtol=0, atol=0, msg=f"input of block {index}")
            hidden = run_block(block, hidden, inputs.call(index, 2), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(hidden, last[0], rtol=0, atol=0)


def test_pruning_methods_leave_sparse_layers():
    ids = token_batch(2, 32)
    for method in ("magnitude", "wanda", "sparsegpt", "alps"):
        model = tiny_llama()
        report = compress(model, calibration=ids, pattern="2:4", method=method, progress=False)
        for _, module in _layers(model):
            assert module.rank == 0 and SparsityPattern.parse("2:4").is_satisfied_by(module.sparse_weight != 0)
        assert all(r.relative_objective > 0 for r in report.layers), method
    with pytest.raises(ValueError, match="prunes only"):
        compress(tiny_llama(), calibration=ids, method="sparsegpt", rank=8, progress=False)


def test_overrides_and_skips():
    model = tiny_llama()
    report = compress(model, calibration=token_batch(2, 32), rank=8, method="hassle-free-exact", iterations=1,
                      overrides={r"mlp\.down_proj": {"rank": 2, "pattern": "4:8"}, "o_proj": {"skip": True},
                                 r"layers\.1\.mlp\.gate": {"method": "wanda", "rank": 0}},
                      progress=False)
    layers = model.model.layers
    assert layers[0].mlp.down_proj.rank == 2 and layers[0].mlp.down_proj.pattern == "4:8"
    assert layers[0].mlp.up_proj.rank == 8
    assert type(layers[1].self_attn.o_proj) is nn.Linear
    assert layers[1].mlp.gate_proj.rank == 0 and layers[0].mlp.gate_proj.rank == 8
    assert len(report.layers) == 12


def test_rank_policies():
    model = tiny_llama()
    report = compress(model, calibration=token_batch(2, 32), rank=RankPolicy.compression(0.3),
                      method="hassle-free-exact", iterations=1, progress=False)
    q = next(r for r in report.layers if r.name.endswith("q_proj"))
    assert q.rank == math.floor((1 - 0.3 - 0.5) * 64 * 64 / 128)


def test_dense_output_matches_modules():
    """Conv1D layers written back in place equal the swapped-in modules' merged weights.

    One block and block-input Hessians, so both runs solve identical problems (otherwise
    rounding differences between merged and factored activations can flip N:M choices)."""
    ids = token_batch(2, 32)
    factored, merged = tiny_model("gpt2", n_layer=1), tiny_model("gpt2", n_layer=1)
    options = dict(calibration=ids, rank=4, method="hassle-free-exact", iterations=2, progress=False,
                   true_sequential=False)
    compress(factored, **options)
    compress(merged, dense=True, **options)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        conv = merged.transformer.h[0].get_submodule(name)
        module = factored.transformer.h[0].get_submodule(name)
        assert type(conv).__name__ == "Conv1D" and isinstance(module, SparseLowRankLinear)
        torch.testing.assert_close(conv.weight.t(), module.to_dense(), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, factored(ids).logits, atol=1e-4, rtol=1e-4)


def test_all_layers_are_validated_before_any_work():
    model = tiny_llama(intermediate_size=130)  # down_proj input width 130 is not a multiple of 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: input width 130"):
        compress(model, calibration=token_batch(2, 32), rank=8, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="exceeds the model's context"):
        compress(tiny_llama(max_position_embeddings=16), calibration=token_batch(2, 32), rank=8, progress=False)
    with pytest.raises(ValueError, match="unknown compress setting.*percdmap"):
        compress(tiny_llama(), calibration=token_batch(2, 32), rank=8, percdmap=0.1, progress=False)


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    ids = token_batch(3, 32)
    options = dict(calibration=ids, rank=4, method="hassle-free", iterations=2, progress=False,
                   lowrank_options={"steps": 3})
    straight = tiny_llama(num_hidden_layers=3)
    compress(straight, out_dir=tmp_path / "straight", **options)
    compress_interrupted(tmp_path / "resumed", after_block=0, **options)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["completed_blocks"] == 1
    resumed = tiny_llama(num_hidden_layers=3)
    report = compress(resumed, out_dir=tmp_path / "resumed", **options)
    assert report.resumed_blocks == 1 and len(report.layers) == 21
    assert_same_state(straight, resumed)
    with pytest.raises(ResumeMismatch, match="changed: iterations"):
        compress(tiny_llama(num_hidden_layers=3), out_dir=tmp_path / "resumed", **{**options, "iterations": 3})


def test_outputs_written_and_reloadable(tmp_path):
    ids = token_batch(2, 32)
    model = tiny_llama()
    compress(model, calibration=ids, rank=4, method="hassle-free-exact", iterations=1, out_dir=tmp_path,
             progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    timings = report["timings"]
    assert len(report["layers"]) == 14 and {"capture", "hessian", "decompose", "propagate"} <= set(timings)
    parts = [timings[f"decompose.{k}"] for k in ("prepare", "P1", "P2", "objective")]
    assert all(t > 0 for t in parts) and sum(parts) <= timings["decompose"]
    assert (tmp_path / "report.png").stat().st_size > 0
    loaded = checkpoint.load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_stories260k_two_four_end_to_end():
    from hasslefree.calibration import calibration_batch
    from hasslefree.data import eval_tokens
    from hasslefree.loading import load_model
    from hasslefree.perplexity import perplexity

    text = stories_text()
    model, tokenizer = load_model("stories260K")
    tokens = eval_tokens(tokenizer, text)
    dense = perplexity(model, tokens, 256, max_windows=16)
    calibration = calibration_batch(tokenizer, text, 8, 256, seed=0)
    compress(model, calibration=calibration, pattern="2:4", rank=8, method="hassle-free-exact", iterations=3,
             progress=False)
    compressed = perplexity(model, tokens, 256, max_windows=16)
    assert math.isfinite(compressed) and compressed > dense
    assert compressed < 4 * dense  # compressed, not destroyed


class _TupleBlock(nn.Module):
    """A pre-norm block that returns (hidden, extra) like older transformers blocks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.gate = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden, scale=None):
        x = self.norm(hidden)
        return hidden + scale * self.down(torch.relu(self.gate(x)) * self.up(x)), None


class _PlainModel(nn.Module):
    """No transformers at all: found by discovery, called with a keyword argument."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_TupleBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, scale=torch.tensor(0.5))[0]
        return type("Output", (), {"logits": self.head(hidden)})()


def test_plain_model_with_tuple_blocks_via_discovery():
    torch.manual_seed(0)
    model = _PlainModel().eval()
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    arch = resolve_architecture(model)
    assert arch.blocks == "blocks" and arch.groups == (("gate", "up"), ("down",))  # call order
    with torch.no_grad():
        reference = model(ids).logits
    compress(model, calibration=ids, pattern="dense", method="sparsegpt", progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    assert type(model.head) is nn.Linear  # outside the blocks: never touched
