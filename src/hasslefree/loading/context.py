"""How long a window a model takes: its context length from the config, and the window check
that calibration, perplexity and the CLI share."""

from __future__ import annotations

from torch import nn

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, if it says."""
    config = getattr(model, "config", None)
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model: nn.Module, seqlen: int | None, default: int = 2048) -> int:
    """The window length to use: ``seqlen`` if it fits the model's context, else a clear error;
    None gives ``default`` capped at the context."""
    context = model_context_length(model)
    if seqlen is None:
        return min(default, context) if context else default
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {context} tokens")
    return seqlen
