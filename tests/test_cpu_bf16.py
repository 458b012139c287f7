"""bf16 products in float32 (hasslefree.cpu_bf16): the float32 result rounded once, only for
large bf16 CPU products, gradients intact, and a whole model's perplexity unchanged beyond
bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hasslefree import cpu_bf16
from hasslefree.cpu_bf16 import MIN_ROWS, Float32Products, bf16_products_in_float32
from hasslefree.perplexity import perplexity
from helpers import tiny_llama


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("rows", [MIN_ROWS, 77])
def test_large_products_are_float32_rounded_once(rows: int) -> None:
    x, w, b = _bf16(rows, 45, seed=0), _bf16(19, 45, seed=1), _bf16(19, seed=2)
    v = _bf16(45, 7, seed=3)
    batch, other = _bf16(3, rows, 45, seed=4), _bf16(3, 45, 11, seed=5)
    with Float32Products():
        got = [F.linear(x, w, b), x @ v, torch.matmul(x, v), x.mm(v), torch.bmm(batch, other)]
    want = [F.linear(x.float(), w.float(), b.float()), x.float() @ v.float(), x.float() @ v.float(),
            x.float() @ v.float(), torch.bmm(batch.float(), other.float())]
    for g, w_ in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, w_.bfloat16())


def test_attention_stays_native() -> None:
    q, k, v = _bf16(1, 2, 40, 8, seed=6), _bf16(1, 2, 40, 8, seed=7), _bf16(1, 2, 40, 8, seed=8)
    with Float32Products():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_small_products_and_other_dtypes_untouched() -> None:
    x, w = _bf16(MIN_ROWS - 1, 45, seed=9), _bf16(19, 45, seed=10)
    with Float32Products():
        small = F.linear(x, w)
        f32 = F.linear(x.float(), w.float())
    assert torch.equal(small, F.linear(x, w))  # the native bf16 call, bit for bit
    assert f32.dtype == torch.float32 and torch.equal(f32, F.linear(x.float(), w.float()))


def test_gradients_flow_through_the_float32_product() -> None:
    x = _bf16(40, 12, seed=11).requires_grad_()
    w = _bf16(5, 12, seed=12).requires_grad_()
    with Float32Products():
        F.linear(x, w).float().sum().backward()
    assert x.grad is not None and w.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.equal(w.grad, x.detach().float().sum(0).expand(5, 12).bfloat16())


@pytest.mark.parametrize("native, env", [(True, None), (False, None), (False, "1"), (False, "0")])
def test_enabled_only_without_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool, env: str | None) -> None:
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: native)
    if env is None:
        monkeypatch.delenv(cpu_bf16.NATIVE_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_bf16.NATIVE_ENV, env)
    seen = []
    monkeypatch.setattr(Float32Products, "__enter__", lambda self: seen.append(1) or self)
    monkeypatch.setattr(Float32Products, "__exit__", lambda self, *a: None)
    with bf16_products_in_float32():
        pass
    assert seen == ([] if native or env == "1" else [1])


def test_model_logits_match_native_bf16() -> None:
    """A whole bf16 model: the products in float32 change its logits only by bf16 rounding."""
    model = tiny_llama(seed=3).to(torch.bfloat16).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(windows).logits.float()
        with Float32Products():
            upcast = model(windows).logits.float()
    scale = plain.abs().max()
    assert float((upcast - plain).abs().max()) <= 0.05 * float(scale)
    assert float(F.cross_entropy(upcast[:, :-1].flatten(0, 1), windows[:, 1:].flatten())) == pytest.approx(
        float(F.cross_entropy(plain[:, :-1].flatten(0, 1), windows[:, 1:].flatten())), rel=1e-2)


def _count_mode_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """The functions :class:`Float32Products` sees from now on (the list fills as they run)."""
    calls = []
    original = Float32Products.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Float32Products, "__torch_function__", counting)
    return calls


def test_perplexity_uses_float32_products_where_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: False)
    calls = _count_mode_calls(monkeypatch)
    model = tiny_llama(seed=3).to(torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    value = perplexity(model, tokens, 64)
    assert F.linear in calls and value > 1.0


def test_prompts_only_mode_skips_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation runs the prompt under the float32 products and decode steps without the mode;
    the model's forward is restored afterwards, also when a call raises."""
    calls = _count_mode_calls(monkeypatch)
    model = tiny_llama(seed=3).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, MIN_ROWS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), cpu_bf16.bf16_products_in_float32_for_prompts(model, enabled=True):
        out = model(input_ids=ids, use_cache=True)
        assert F.linear in calls
        calls.clear()
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        assert calls == []
        model(ids)  # positional input_ids
        assert F.linear in calls
    assert "forward" not in model.__dict__
    with pytest.raises(RuntimeError):
        with cpu_bf16.bf16_products_in_float32_for_prompts(model, enabled=True):
            raise RuntimeError("stop")
    assert "forward" not in model.__dict__
    calls.clear()
    with torch.no_grad(), cpu_bf16.bf16_products_in_float32_for_prompts(model, enabled=False):
        model(input_ids=ids)
    assert calls == []
