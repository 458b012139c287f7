"""HSSLinear in the checkpoint format: bit-identical round trip, compact sizes, fresh-process loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from hasslefree.checkpoint import (
    CheckpointError,
    checkpoint_info,
    codec_for_module,
    export_dense,
    format_info,
    load_compressed,
    save_compressed,
)
from hasslefree.hss import HSSLinear, compress_linear_hss
from hasslefree.nn import replace_linear

pytest.importorskip("transformers")
torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[2] / "src"
VARIANT_OF = {"q_proj": "shss-rcm", "k_proj": "shss", "v_proj": "shss-rcm-whitened", "o_proj": "shss-whitened"}


def bits(t: Tensor) -> Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def hss_llama(dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    """Tiny random Llama whose four attention projections are HSS layers (all four variants)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attention_bias=bias, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    hessian = x.T @ x / 300
    for i, block in enumerate(model.model.layers):
        for proj, variant in VARIANT_OF.items():
            name = f"model.layers.{i}.self_attn.{proj}"
            lin = model.get_submodule(name)
            layer = compress_linear_hss(lin.weight.detach(), None if lin.bias is None else lin.bias.detach() + 0.01,
                                        sparsity=0.3, outer_rank=6, leaf=16, min_rank=2, variant=variant,
                                        hessian=hessian)
            replace_linear(model, name, layer)
    return model.to(dtype)


def logits(model: nn.Module) -> Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    model = hss_llama(dtype)
    ref = logits(model)
    save_compressed(model, tmp_path, run_config={"method": "shss-rcm"})
    loaded = load_compressed(tmp_path)
    assert torch.equal(bits(logits(loaded)), bits(ref))
    for name, mod in model.named_modules():
        if isinstance(mod, HSSLinear):
            new = loaded.get_submodule(name)
            assert isinstance(new, HSSLinear) and new.config == mod.config
            for key, t in mod.state_dict().items():
                other = new.state_dict()[key]
                assert other.dtype == t.dtype and torch.equal(other, t), (name, key)
    cfg = json.loads((tmp_path / "hasslefree_config.json").read_text())
    assert len(cfg["layers"]) == 8 and {layer["kind"] for layer in cfg["layers"]} == {"hss_linear"}


def test_compact_storage_and_info(tmp_path: Path) -> None:
    model = hss_llama(torch.bfloat16)
    save_compressed(model, tmp_path)
    info = checkpoint_info(tmp_path)
    for layer in info["layers"]:
        assert layer["analytic_bytes"] == pytest.approx(layer["measured_bytes"], rel=0.01), layer["name"]
        mod = model.get_submodule(layer["name"])
        out_f, in_f = mod.shape
        nnz = mod.s_values.numel()
        # Independent arithmetic: bf16 values (S, HSS, bias), int16 columns, int32 row pointers,
        # int16 permutations only for the RCM variants.
        expect = 2 * mod.parameter_count() + 2 * nnz + 4 * (out_f + 1)
        if "rcm" in mod.config["variant"]:
            expect += 2 * (out_f + in_f)
        assert layer["measured_bytes"] == expect, layer["name"]
        assert layer["pattern"].startswith(mod.config["variant"]) and layer["rank"] == 6
    assert info["totals"]["analytic_over_measured"] == pytest.approx(1.0, rel=1e-9)
    assert "shss-rcm-whitened s=0.3 leaf=16" in format_info(info)


def test_codec_is_found_for_hss_layers() -> None:
    layer = compress_linear_hss(torch.randn(8, 12), sparsity=0.2, outer_rank=2, leaf=4, min_rank=1)
    assert codec_for_module(layer).kind == "hss_linear"


def test_fresh_process_that_imports_only_checkpoint(tmp_path: Path) -> None:
    model = hss_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    save_compressed(model, tmp_path / "ckpt")
    from safetensors.torch import save_file

    save_file({"ids": ids, "logits": logits(model)}, str(tmp_path / "ref.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        from hasslefree.checkpoint import load_compressed
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = load_compressed({str(tmp_path / "ckpt")!r})
        with torch.no_grad():
            out = model(ref["ids"]).logits
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "HSSLinear"
        assert "hasslefree.pipeline" not in sys.modules
        sys.exit(0 if torch.equal(out, ref["logits"]) else 3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_corrupted_permutation_is_a_checkpoint_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_compressed(hss_llama(bias=False), tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.row_perm"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="q_proj.*not a permutation"):
        load_compressed(tmp_path)


def test_export_dense_merges_hss(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = hss_llama(bias=False)
    export_dense(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-4, atol=1e-4)
