"""Perplexity under the SparseGPT protocol, so numbers compare with the papers'.

The token stream is cut into non-overlapping windows of ``seqlen`` tokens (the incomplete
tail is dropped); each window is scored on its own, predicting its last ``seqlen - 1``
tokens from the tokens before them in the same window. Perplexity is
``exp(total NLL / total predicted tokens)``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hasslefree.cpu_bf16 import bf16_products_in_float32
from hasslefree.loading.context import model_context_length

from .data import eval_max_windows, eval_tokens

logger = logging.getLogger(__name__)

__all__ = ["perplexity", "dataset_perplexity", "eval_tokens"]



def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on ``tokens`` ``[1, T]`` (or ``[T]``) in windows of ``seqlen``.

    ``max_windows`` keeps only the first windows (the C4 protocol uses 256). Runs under
    ``torch.inference_mode`` with the model temporarily in eval mode.
    """
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must have shape [1, T], got {tuple(tokens.shape)}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    context = model_context_length(model)
    if context is not None and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context length ({context} positions)")
    total = tokens.shape[1]
    n_windows = total // seqlen
    if n_windows == 0:
        raise ValueError(f"got {total} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)

    device = torch.device(device) if device is not None else _model_device(model)
    windows = tokens[0, : n_windows * seqlen].view(n_windows, seqlen)
    nll = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), bf16_products_in_float32():
            for first in range(0, n_windows, batch_size):
                batch = windows[first : first + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll += _summed_nll(logits, batch).double().cpu()
                if progress:
                    done = min(first + batch_size, n_windows)
                    logger.info(
                        "perplexity: %d/%d windows, running ppl %.4f, %.1f s",
                        done, n_windows, math.exp(nll.item() / (done * (seqlen - 1))),
                        time.perf_counter() - start,
                    )
    finally:
        model.train(was_training)
    return math.exp(nll.item() / (n_windows * (seqlen - 1)))


def _summed_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL inside each window (position t predicts token t + 1)."""
    shift_logits = logits[:, :-1, :].float()
    targets = batch[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="sum")


def dataset_perplexity(
    model: nn.Module,
    tokenizer: Any,
    name_or_path: str | Path,
    seqlen: int = 2048,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    data_root: str | Path | None = None,
    progress: bool = False,
) -> float:
    """Protocol perplexity on a named dataset or file; ``seqlen`` is capped at the model's context."""
    context = model_context_length(model)
    if context is not None and seqlen > context:
        logger.info("seqlen %d capped at the model's context length %d", seqlen, context)
        seqlen = context
    tokens = eval_tokens(tokenizer, name_or_path, seqlen=seqlen, data_root=data_root)
    return perplexity(
        model, tokens, seqlen, batch_size=batch_size, device=device,
        max_windows=eval_max_windows(name_or_path), progress=progress,
    )
