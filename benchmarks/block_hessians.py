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

from hasslefree.calibration import calibration_batch
from hasslefree.hessian import HessianAccumulator
from hasslefree.loading import load_model

logger = logging.getLogger(__name__)

LLAMA_LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class _Stop(Exception):
    pass


def input_hessians(model, modules: dict, windows: torch.Tensor, last_block: int,
                   dtype: torch.dtype = torch.float32) -> dict:
    """H = running mean of xxᵀ of each module's input over ``windows`` (one dense forward each).

    The forward stops after decoder block ``last_block``, so deeper blocks cost nothing.
    """
    accumulators = {key: HessianAccumulator(module.in_features, dtype=dtype) for key, module in modules.items()}
    handles = [module.register_forward_pre_hook(lambda _m, args, acc=accumulators[key]: acc.add(args[0]))
               for key, module in modules.items()]

    def stop(*_):
        raise _Stop

    handles.append(model.model.layers[last_block].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for window in windows:
                try:
                    model(window.unsqueeze(0))
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {key: acc.hessian for key, acc in accumulators.items()}


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
    accumulators = input_hessians(model, {name: layer.get_submodule(name) for name in LLAMA_LAYERS},
                                  calibration, block, dtype=torch.float64)
    problems = {name: (layer.get_submodule(name).weight.detach().float().clone(),
                       accumulators[name].float()) for name in LLAMA_LAYERS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.{k}": t.contiguous() for n, (w, h) in problems.items()
               for k, t in (("weight", w), ("hessian", h))}, str(cache))
    logger.info("cached block %d problems at %s", block, cache)
    return problems
