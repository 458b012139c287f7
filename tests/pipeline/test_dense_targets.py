"""layer_target="model": the moved target W' against brute-force least squares, the cross
statistic C = X_cᵀX_d against plain forward passes on every block (a skipped block included),
and the pipeline runs (resume, HSS, matching targets) that use them."""

from __future__ import annotations

import json

import pytest
import torch

from hasslefree.pipeline import DEFAULT_SKIP, compress
from hasslefree.pipeline import sequential
from hasslefree.pipeline.block_passes import CrossAccumulator
from hasslefree.pipeline.dense_targets import moved_targets
from helpers import compress_interrupted, tiny_llama, token_batch

torch.set_num_threads(1)

COMMON = dict(pattern="2:4", rank=4, method="hassle-free-fast", iterations=3, progress=False)
GROUP_HEADS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def _damping(h: torch.Tensor, percdamp: float, coordinate_damp: float) -> torch.Tensor:
    return torch.diag(percdamp * h.diagonal().mean() + coordinate_damp * h.diagonal())


def _problem(out_f: int, in_f: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, in_f, generator=g, dtype=torch.float64) * torch.rand(in_f, generator=g, dtype=torch.float64)
    xc = xd + 0.3 * torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return xc, xd, w


@pytest.mark.parametrize("out_f, in_f, tokens, percdamp, coordinate_damp", [
    (7, 13, 37, 0.01, 0.0), (5, 24, 300, 0.005, 0.005), (11, 9, 8, 0.1, 0.0),  # 8 tokens < 9 inputs: H singular
])
def test_moved_target_is_the_least_squares_answer_of_the_asymmetric_objective(out_f, in_f, tokens, percdamp,
                                                                           coordinate_damp):
    xc, xd, w = _problem(out_f, in_f, tokens, seed=in_f)
    h, c = xc.T @ xc / tokens, xc.T @ xd / tokens
    damping = _damping(h, percdamp, coordinate_damp)
    # brute force: min ‖X_d Wᵀ − X_c Ŵᵀ‖²/n + ‖Λ^½ (W − Ŵ)ᵀ‖² as one stacked least-squares problem
    root = damping.sqrt()
    a = torch.cat([xc / tokens ** 0.5, root])
    b = torch.cat([xd @ w.T / tokens ** 0.5, root @ w.T])
    expected = torch.linalg.lstsq(a, b).solution.T
    moved = moved_targets({"w": w.float()}, h, c, percdamp=percdamp, coordinate_damp=coordinate_damp)["w"]
    assert moved.dtype == torch.float32
    torch.testing.assert_close(moved.double(), expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))

    def asymmetric(candidate):
        return float((xd @ w.T - xc @ candidate.T).pow(2).sum() / tokens
                     + ((w - candidate) @ damping * (w - candidate)).sum())

    def ordinary(candidate):  # what every solver minimises on W' with the damped H
        delta = candidate - moved.double()
        return float((delta @ (h + damping) * delta).sum())

    g = torch.Generator().manual_seed(1)
    one, two = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) for _ in range(2))
    assert asymmetric(one) - ordinary(one) == pytest.approx(asymmetric(two) - ordinary(two), rel=1e-4, abs=1e-4)


def test_moved_target_is_the_weight_when_both_inputs_agree():
    xc, _, w = _problem(6, 10, 50, seed=3)
    xc[:, 4] = 0.0  # a dead input
    h = xc.T @ xc / 50
    moved = moved_targets({"a": w.float(), "b": 2 * w.float()}, h, h.clone(), percdamp=0.01, coordinate_damp=0.0)
    assert torch.equal(moved["a"], w.float()) and torch.equal(moved["b"], 2 * w.float())


def test_cross_accumulator_is_the_mean_product_over_batches_of_any_shape():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)),
             (torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g))]
    acc = CrossAccumulator(7)
    for x, y in pairs:
        acc.add_pair(x, y)
    xs = torch.cat([x.reshape(-1, 7) for x, _ in pairs]).double()
    ys = torch.cat([y.reshape(-1, 7) for _, y in pairs]).double()
    assert acc.tokens == 13
    torch.testing.assert_close(acc.hessian.double(), xs.T @ ys / 13, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        acc.add_pair(torch.zeros(2, 7), torch.zeros(3, 7))


def _group_inputs(model, blocks: int, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every group's input, window by window, from plain forward passes of ``model``."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for index in range(blocks):
        for head in GROUP_HEADS:
            name = f"model.layers.{index}.{head}"
            store = seen.setdefault(name, [])
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, store=store: store.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for window in ids:
            model(window[None])
    for handle in handles:
        handle.remove()
    return seen


def test_every_block_gets_the_cross_statistic_of_the_dense_and_the_compressed_model(monkeypatch):
    blocks, ids = 4, token_batch(4, 24)
    dense = tiny_llama(num_hidden_layers=blocks)
    dense_inputs = _group_inputs(dense, blocks, ids)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spy(weights, hessian, cross, **kwargs):
        seen[min(weights)] = (hessian.clone(), cross.clone())
        return moved_targets(weights, hessian, cross, **kwargs)

    monkeypatch.setattr(sequential, "moved_targets", spy)
    model = tiny_llama(num_hidden_layers=blocks)
    # block 1 stays dense: the dense model's hidden states must still move through it
    report = compress(model, calibration=ids, layer_target="model", skip=(*DEFAULT_SKIP, r"\.layers\.1\."), **COMMON)
    assert {r.block for r in report.layers} == {0, 2, 3}
    assert report.config["layer_target"] == "model" and report.timings["dense targets"] > 0
    compressed_inputs = _group_inputs(model, blocks, ids)
    expected_groups = {f"model.layers.{b}.{h}" for b in (0, 2, 3) for h in GROUP_HEADS}
    assert {name.replace("k_proj", "q_proj").replace("up_proj", "gate_proj") for name in seen} == expected_groups
    for name in expected_groups:
        key = next(k for k in seen if k.replace("k_proj", "q_proj").replace("up_proj", "gate_proj") == name)
        hessian, cross = seen[key]
        xc, xd = torch.cat(compressed_inputs[name]).double(), torch.cat(dense_inputs[name]).double()
        tokens = xc.shape[0]
        torch.testing.assert_close(hessian.double(), xc.T @ xc / tokens, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(cross.double(), xc.T @ xd / tokens, rtol=1e-4, atol=1e-5, msg=name)
        if name == "model.layers.0.self_attn.q_proj":  # nothing compressed before it yet
            torch.testing.assert_close(cross, hessian, rtol=1e-6, atol=1e-7)
        else:
            assert float((cross - hessian).abs().max()) > 1e-4 * float(hessian.abs().max()), name


@pytest.mark.parametrize("settings", [COMMON, dict(method="shss", hss={"sparsity": 0.3, "outer_rank": 8, "leaf": 16},
                                                    progress=False)], ids=["sparse-lowrank", "hss"])
def test_model_targets_change_every_block(settings):
    ids = token_batch(4, 24)
    plain, moved = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    compress(plain, calibration=ids, **settings)
    compress(moved, calibration=ids, layer_target="model", **settings)
    a, b = plain.state_dict(), moved.state_dict()
    assert a.keys() == b.keys()
    for index in (1, 2):  # block 0's first group sees the dense inputs either way; later groups do not
        names = [k for k in a if f"layers.{index}." in k and "norm" not in k]
        assert any(not torch.equal(a[k], b[k]) for k in names), index


def test_model_target_run_resumes_bit_for_bit(tmp_path):
    ids = token_batch(4, 24)
    options = dict(calibration=ids, layer_target="model", **COMMON)
    straight = tiny_llama(num_hidden_layers=3)
    compress(straight, out_dir=tmp_path / "straight", **options)
    compress_interrupted(tmp_path / "resumed", after_block=1, **options)
    resumed = tiny_llama(num_hidden_layers=3)
    report = compress(resumed, out_dir=tmp_path / "resumed", **options)
    assert report.resumed_blocks == 2
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "resumed" / "report.json").read_text())["config"]["layer_target"] == "model"


@pytest.mark.parametrize("layer_target", ["layer", "model"])
def test_matching_to_the_model_chases_the_dense_hidden_states_past_a_skipped_block(monkeypatch, layer_target):
    blocks, ids = 4, token_batch(3, 24)
    dense = tiny_llama(num_hidden_layers=blocks)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(blocks)}
    handles = [dense.model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: outputs[i].append((out[0] if isinstance(out, tuple) else out).detach()))
        for i in range(blocks)]
    with torch.no_grad():
        for window in ids:
            dense(window[None])
    for handle in handles:
        handle.remove()
    targets: dict[int, list[torch.Tensor]] = {}
    real = sequential.match_block

    def spy(block, index, hidden, block_targets, *args, **kwargs):
        targets[index] = [t.clone() for t in block_targets]
        return real(block, index, hidden, block_targets, *args, **kwargs)

    monkeypatch.setattr(sequential, "match_block", spy)
    compress(tiny_llama(num_hidden_layers=blocks), calibration=ids, layer_target=layer_target,
             match={"epochs": 1, "lr": 1e-4, "target": "model"}, skip=(*DEFAULT_SKIP, r"\.layers\.1\."), **COMMON)
    assert sorted(targets) == [0, 2, 3]
    for index in (0, 2, 3):
        torch.testing.assert_close(torch.cat(targets[index]), torch.cat(outputs[index]), rtol=1e-4, atol=1e-5)
