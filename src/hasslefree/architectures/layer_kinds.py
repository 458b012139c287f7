"""Which modules count as linear layers: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""

from __future__ import annotations

from torch import nn

try:  # transformers is an optional dependency of the core engine
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Layers the pipeline can decompose: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
