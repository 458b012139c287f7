"""Fallback for models the registry does not list: find the blocks and the shared-input groups.

Blocks: the longest ``nn.ModuleList`` whose children all share one class and contain
linear layers. Groups: one tiny forward pass with hooks on block 0's linear layers; layers
that receive the very same input tensor form a group, in call order. Anything ambiguous fails
with a message that says to add a registry entry instead of guessing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hasslefree.architectures.architecture import Architecture
from hasslefree.architectures.layer_kinds import is_linear_like
from hasslefree.forward_stop import StopForward, run_until_stopped

logger = logging.getLogger(__name__)

PROBE_TOKENS = 8


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the largest ModuleList of identical blocks holding linear layers."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(is_linear_like(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((len(module), size, name, module))
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                         "identical blocks with linear layers; add an entry to hasslefree.architectures.registry")
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, name, blocks = candidates[0]
    return name, blocks


@torch.no_grad()
def find_groups(model: nn.Module, block: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Block-relative names of linear layers grouped by identical input, in call order."""
    linears = {name: m for name, m in block.named_modules() if name and is_linear_like(m)}
    seen: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, []).append(args[0])
        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in linears.items()]

    def stop(*_args) -> None:  # block 0 ran: the rest of the probe pass need not
        raise StopForward

    handles.append(block.register_forward_hook(stop))
    try:
        run_until_stopped(model, input_ids=_probe_ids(model), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    never = sorted(set(linears) - set(seen))
    if never:
        raise ValueError(f"cannot group the linear layers of {type(block).__name__}: {', '.join(never)} never ran "
                         "in a forward pass; add an entry to hasslefree.architectures.registry")
    reused = sorted(n for n, inputs in seen.items() if len(inputs) > 1)
    if reused:
        raise ValueError(f"cannot group the linear layers of {type(block).__name__}: {', '.join(reused)} run more "
                         "than once per forward pass; add an entry to hasslefree.architectures.registry")
    groups: list[tuple[list[str], torch.Tensor]] = []
    for name in seen:  # dicts keep insertion (= call) order
        x = seen[name][0]
        for members, first in groups:
            if _same_tensor(x, first):
                members.append(name)
                break
        else:
            groups.append(([name], x))
    return tuple(tuple(members) for members, _ in groups)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The very same activation (object or memory), not merely equal values: two layer norms
    that happen to produce equal outputs at initialisation must not merge into one group."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def discover_architecture(model: nn.Module) -> Architecture:
    """An :class:`Architecture` for an unlisted model, found by inspection and one probe pass."""
    path, blocks = find_block_list(model)
    was_training = model.training
    model.eval()
    try:
        groups = find_groups(model, blocks[0])
    except ValueError:
        raise
    except Exception as exc:  # the probe forward itself failed
        raise ValueError(f"cannot probe {type(model).__name__} to group its linear layers ({exc}); add an entry "
                         "to hasslefree.architectures.registry") from exc
    finally:
        model.train(was_training)
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    logger.info("discovered %d blocks at %r with groups %s", len(blocks), path, groups)
    return Architecture(f"discovered:{model_type}", path, groups, (model_type,))


def _probe_ids(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", 2)
    device = next(model.parameters()).device
    return (torch.arange(PROBE_TOKENS, device=device) % int(vocab)).unsqueeze(0)
