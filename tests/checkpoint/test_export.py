"""Exports: dense (plain transformers) and sparse base + LoRA adapter (peft).

Tolerance: the exports compute the same function in a different order —
dense merges ``x (W_S + U Vᵀ)ᵀ`` instead of ``x W_Sᵀ + (x V) Uᵀ``, and peft runs
``lora_A``/``lora_B`` as separate Linears on contiguous copies — so float32
results differ only by reassociation rounding: a few ulps per dot product
(eps = 1.2e-7, sums of ≤ 172 terms), carried through 2 blocks. We allow
atol = rtol = 1e-5, ~100× that and far below any real difference (a missing or
transposed factor changes logits at the 1e-2 level here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hasslefree.checkpoint import export_dense, export_peft, save_compressed
from hasslefree.nn import SparseLowRankLinear, replace_linear
from helpers import tiny_compressed_llama

TOL = {"atol": 1e-5, "rtol": 1e-5}


def run(model: nn.Module) -> Tensor:
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = tiny_compressed_llama(tied=False)
    directory = tmp_path_factory.mktemp("ckpt")
    save_compressed(model, directory)
    return model, directory


def _no_hasslefree_traces(out_dir: Path) -> None:
    cfg = json.loads((out_dir / "config.json").read_text())
    assert "hasslefree" not in json.dumps(cfg).lower()


def test_export_dense_loads_in_plain_transformers(compressed: tuple[nn.Module, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, directory = compressed
    export_dense(directory, tmp_path)
    _no_hasslefree_traces(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SparseLowRankLinear) for m in dense.modules())
    q = dense.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and torch.equal(q.weight, model.model.layers[0].self_attn.q_proj.to_dense())
    torch.testing.assert_close(run(dense), run(model), **TOL)


def test_export_from_model_leaves_it_unchanged(tmp_path: Path) -> None:
    model = tiny_compressed_llama(seed=1, tied=False)
    before = run(model)
    export_dense(model, tmp_path / "dense")
    export_peft(model, tmp_path / "peft")
    assert isinstance(model.model.layers[1].mlp.up_proj, SparseLowRankLinear)
    assert torch.equal(run(model), before)


def test_export_peft_reproduces_compressed_model(compressed: tuple[nn.Module, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, directory = compressed
    export_peft(directory, tmp_path)
    _no_hasslefree_traces(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    k = base.model.layers[1].self_attn.k_proj
    assert torch.equal(k.weight, model.model.layers[1].self_attn.k_proj.sparse_weight)  # base is W_S exactly
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(run(peft_model), run(model), **TOL)
    # Without the adapter the outputs must differ: the LoRA half really carries U Vᵀ.
    with peft_model.disable_adapter():
        assert not torch.allclose(run(peft_model), run(model), **TOL)


def test_adapter_layout_matches_peft(compressed: tuple[nn.Module, Path], tmp_path: Path) -> None:
    """Our adapter keys/shapes equal what peft itself saves for the same LoraConfig."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, directory = compressed
    export_peft(directory, tmp_path)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"]
    assert "model.layers.1.mlp.down_proj" not in cfg["target_modules"]  # rank 0: no adapter
    assert cfg["r"] == 4  # 7 layers of rank 4, 6 of rank 8: the majority is the default
    assert set(cfg["rank_pattern"].values()) == {8} and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert re.escape("model.layers.1.mlp.up_proj") in cfg["rank_pattern"]
    ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))

    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path), LoraConfig(**{k: cfg[k] for k in keys}))
    theirs = get_peft_model_state_dict(reference)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    name = "model.layers.0.mlp.gate_proj"
    slr = model.get_submodule(name)
    assert torch.equal(ours[f"base_model.model.{name}.lora_B.weight"], slr.U)
    assert torch.equal(ours[f"base_model.model.{name}.lora_A.weight"], slr.V.T)


def test_export_copies_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    save_compressed(tiny_compressed_llama(tied=False), tmp_path / "ckpt", tokenizer=tok)
    export_dense(tmp_path / "ckpt", tmp_path / "dense")
    assert AutoTokenizer.from_pretrained(tmp_path / "dense").convert_tokens_to_ids("a") == 0


def test_peft_scaling_is_one() -> None:
    """lora_alpha = r gives delta = B @ A exactly, so lora_B = U, lora_A = Vᵀ need no rescale."""
    from hasslefree.checkpoint.export import lora_config_for

    cfg = lora_config_for({"a.q": 8, "a.k": 8, "b.v": 16}, "base")
    assert cfg.r == 8 and cfg.lora_alpha == 8
    assert cfg.rank_pattern == {re.escape("b.v"): 16} == cfg.alpha_pattern
    x, U, V = torch.randn(3, 5), torch.randn(4, 2), torch.randn(5, 2)
    torch.testing.assert_close(F.linear(F.linear(x, V.T), U) * (2 / 2), x @ (U @ V.T).T)


def test_gpt2_exports_keep_conv1d_layout(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (in x out): both exports must load in plain transformers/peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import tiny_model, token_batch
    from hasslefree.pipeline import compress

    model = tiny_model("gpt2", n_layer=1)
    compress(model, calibration=token_batch(4, 16), pattern="2:4", rank=4, method="hassle-free-exact",
             iterations=2, progress=False)
    ids = token_batch(2, 12, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    export_dense(model, tmp_path / "dense")
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()(ids).logits
    torch.testing.assert_close(dense, expected, **TOL)
    export_peft(model, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()(ids).logits
    torch.testing.assert_close(peft_logits, expected, **TOL)
