"""Bytes on disk of a compressed block at Llama-3-8B shapes, measured from a saved checkpoint.

Builds a one-block Llama with the Llama-3-8B layer shapes (random bf16 weights, a small
vocabulary so the embeddings stay small), replaces its seven linear layers by 2:4 (magnitude)
+ rank-64 SparseLowRankLinear modules, saves it with ``save_compressed`` and reports
``checkpoint_info``: stored bytes per layer against the dense bf16 bytes and the analytic
count. The decomposition itself does not change the sizes, so none is run.

    python benchmarks/checkpoint_size.py --pattern 2:4 --rank 64
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hasslefree.checkpoint import checkpoint_info, format_info, save_compressed
from hasslefree.nn import SparseLowRankLinear, replace_linear
from hasslefree.patterns import SparsityPattern
from results_log import append_record



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    pattern = SparsityPattern.parse(args.pattern)
    for name, module in list(model.model.layers[0].named_modules()):
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            u = torch.randn(weight.shape[0], args.rank, dtype=weight.dtype) * 0.01
            v = torch.randn(weight.shape[1], args.rank, dtype=weight.dtype) * 0.01
            layer = SparseLowRankLinear.from_linear_parts(pattern.project(weight), u, v, None, str(pattern))
            replace_linear(model, f"model.layers.0.{name}", layer)
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, tmp, run_config={"method": "magnitude (sizes only)", "pattern": str(pattern),
                                                 "rank_policy": str(args.rank)})
        info = checkpoint_info(tmp)
    print(format_info(info))
    append_record("checkpoint_size", {"info": info})


if __name__ == "__main__":
    main()
