"""Real layer problems for benchmarks: the weights and Hessians of one decoder block.

Runs the calibration windows through the embeddings and blocks 0..block only (hooks stop
the forward there), accumulating H = XᵀX per distinct layer input, and caches the result
as safetensors so repeated benchmark runs skip the forward passes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hasslefree.data import calibration_batch
from hasslefree.hessian import HessianAccumulator
from hasslefree.loading import load_model

logger = logging.getLogger(__name__)

LLAMA_LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class _Stop(Exception):
    pass


def block_problems(model_spec: str, block: int, nsamples: int, seqlen: int, seed: int = 0,
                   calib: str = "c4", cache_dir: Path = Path(".cache")) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (weight, hessian)}`` for the linear layers of decoder block ``block``."""
    key = hashlib.sha1(f"{model_spec}|{block}|{nsamples}|{seqlen}|{seed}|{calib}".encode()).hexdigest()[:12]
    cache = cache_dir / f"block_hessians_{key}.safetensors"
    if cache.exists():
        tensors = load_file(cache)
        return {name: (tensors[f"{name}.weight"], tensors[f"{name}.hessian"]) for name in LLAMA_LAYERS}
    model, tokenizer = load_model(model_spec)
    calibration = calibration_batch(tokenizer, calib, nsamples, seqlen, seed)
    layer = model.model.layers[block]
    accumulators = {name: HessianAccumulator(layer.get_submodule(name).in_features, dtype=torch.float64)
                    for name in LLAMA_LAYERS}
    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, acc=accumulators[name]: acc.add(args[0])) for name in LLAMA_LAYERS]

    def stop(*_):
        raise _Stop

    handles.append(layer.register_forward_hook(stop))
    with torch.inference_mode():
        for window in calibration:
            try:
                model(window.unsqueeze(0))
            except _Stop:
                pass
    for handle in handles:
        handle.remove()
    problems = {name: (layer.get_submodule(name).weight.detach().float().clone(),
                       accumulators[name].hessian.float()) for name in LLAMA_LAYERS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.{k}": t.contiguous() for n, (w, h) in problems.items()
               for k, t in (("weight", w), ("hessian", h))}, str(cache))
    logger.info("cached block %d problems at %s", block, cache)
    return problems
