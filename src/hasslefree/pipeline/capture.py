"""Capture what the decoder blocks are called with, so each block can be run on its own.

Two kinds of input are recorded with forward pre-hooks (``with_kwargs=True``):

* the hidden states entering block 0, for every calibration batch: the forward pass is cut
  short by raising a private exception from block 0's hook, so only the embeddings run;
* every block's other arguments (attention mask, position ids, rotary ``(cos, sin)``,
  cache position, ...), once per batch shape: they depend on positions only, not on token
  values, but may differ between blocks (sliding-window and global layers of Gemma 2/3 get
  different masks and rotary tables), so one probe pass records them for all blocks.

Everything is stored on the CPU; objects shared between blocks stay shared.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hasslefree.cpu_bf16 import bf16_products_in_float32
from hasslefree.forward_stop import StopForward, run_until_stopped

if TYPE_CHECKING:
    from hasslefree.loading.streaming import BlockWeights

logger = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class BlockInputs:
    """Calibration activations entering the current block, plus how every block is called."""

    hidden: list[torch.Tensor]
    calls: dict[int, list[Call]] = field(default_factory=dict)  # batch size -> per-block (args, kwargs)

    def call(self, block_index: int, batch: int) -> Call:
        return self.calls[batch][block_index]


def split_batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(calibration.split(batch_size, dim=0))


def to_device(value: Any, device: torch.device | str,
              memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Move tensors inside nested tuples/lists/dicts; a memo keeps shared objects shared.

    The memo maps ``id(original)`` to ``(original, moved)``: holding the original keeps its
    id from being reused by a later, different object (calls of different blocks are built
    from short-lived tuples and dicts, whose ids Python recycles).
    """
    memo = {} if memo is None else memo
    key = id(value)
    seen = memo.get(key)
    if seen is not None and seen[0] is value:
        return seen[1]
    if isinstance(value, torch.Tensor):
        moved = value.detach().to(device)
    elif isinstance(value, tuple) and not hasattr(value, "_fields"):
        moved = tuple(to_device(v, device, memo) for v in value)
    elif isinstance(value, list):
        moved = [to_device(v, device, memo) for v in value]
    elif isinstance(value, dict):
        moved = {k: to_device(v, device, memo) for k, v in value.items()}
    else:
        moved = value
    memo[key] = (value, moved)
    return moved


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns, whether it returns a tensor or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
    """(hidden states, remaining call) from what a block's pre-hook sees."""
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    elif "hidden_states" in kwargs:
        hidden, rest = kwargs.pop("hidden_states"), ()
    else:
        raise TypeError("the block was called without hidden states as first argument or 'hidden_states='")
    rest = tuple(_drop_cache(a) for a in rest)
    kwargs = {k: _drop_cache(v) for k, v in kwargs.items()}
    return hidden, (rest, kwargs)


def _drop_cache(value: Any) -> Any:
    """KV caches would grow with every replayed call; blocks run without one."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return value
    return None if isinstance(value, Cache) else value


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def blocks_visit_device(blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move each block onto ``device`` only while it runs (no-op when it already lives there)."""
    home = [next(b.parameters()).device for b in blocks]
    if all(h == device for h in home):
        yield
        return
    def arrive(module: nn.Module, _args: tuple) -> None:
        module.to(device)

    def leave(origin: torch.device):
        def hook(module: nn.Module, _args: tuple, _output: Any) -> None:
            module.to(origin)
        return hook

    handles = []
    for block, origin in zip(blocks, home):
        handles.append(block.register_forward_pre_hook(arrive))
        handles.append(block.register_forward_hook(leave(origin)))
    with _hooks(handles):
        yield


@contextlib.contextmanager
def blocks_stream_in(blocks: nn.ModuleList, device: torch.device, weights: BlockWeights) -> Iterator[None]:
    """Read each (meta) block from disk only while it runs, then drop it again."""
    def arrive(index: int):
        def hook(module: nn.Module, _args: tuple) -> None:
            weights.load(index, module)
            module.to(device)
        return hook

    def leave(module: nn.Module, _args: tuple, _output: Any) -> None:
        weights.release(module)

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(arrive(i)), b.register_forward_hook(leave))]
    with _hooks(handles):
        yield


def _forward(model: nn.Module, input_ids: torch.Tensor) -> None:
    with bf16_products_in_float32():
        stopped = run_until_stopped(model, input_ids=input_ids, use_cache=False)
    if stopped:
        return
    raise RuntimeError("the model ran to the end without calling its decoder blocks")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, *,
                         batch_size: int, device: torch.device, dtype: torch.dtype,
                         weights: BlockWeights | None = None) -> BlockInputs:
    """Block-0 inputs of every calibration batch and every block's call, stored on the CPU.

    The model's non-block modules must already be on ``device``; blocks are visited there
    one at a time during the single probe pass per batch shape (read from ``weights`` and
    dropped again when they are streamed).
    """
    batches = split_batches(calibration, batch_size)
    hidden: list[torch.Tensor] = []

    def record_hidden(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states, _ = _split_call(args, kwargs)
        hidden.append(states.detach().to("cpu", dtype))
        raise StopForward

    with _hooks([blocks[0].register_forward_pre_hook(record_hidden, with_kwargs=True)]):
        for batch in batches:
            _forward(model, batch.to(device))

    inputs = BlockInputs(hidden)
    for batch in batches:
        if batch.shape[0] not in inputs.calls:
            inputs.calls[batch.shape[0]] = _probe_calls(model, blocks, batch.to(device), weights)
    logger.debug("captured %d batches entering block 0; calls recorded for batch sizes %s",
                 len(hidden), sorted(inputs.calls))
    return inputs


def _probe_calls(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                 weights: BlockWeights | None = None) -> list[Call]:
    """Run one batch through the blocks, recording each block's arguments (hidden states aside)."""
    calls: list[Call | None] = [None] * len(blocks)
    memo: dict[int, tuple[Any, Any]] = {}
    last = len(blocks) - 1

    def recorder(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, call = _split_call(args, kwargs)
            calls[index] = to_device(call, "cpu", memo)
            if index == last:
                raise StopForward
        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = input_ids.device
    visits = blocks_visit_device(blocks, device) if weights is None else blocks_stream_in(blocks, device, weights)
    with _hooks(handles), visits:
        _forward(model, input_ids)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"blocks {missing} were not called in the forward pass")
    return calls  # type: ignore[return-value]


def run_block(block: nn.Module, hidden: torch.Tensor, call: Call, device: torch.device,
              block_dtype: torch.dtype) -> torch.Tensor:
    """One block on one batch; the result stays on ``device``. Large bf16 CPU products run in
    float32 where the CPU has no native bf16 (:mod:`hasslefree.cpu_bf16`)."""
    args, kwargs = to_device(call, device)
    with bf16_products_in_float32():
        return block_output(block(hidden.to(device, block_dtype), *args, **kwargs))


@contextlib.contextmanager
def rest_of_model_on(model: nn.Module, blocks_path: str, device: torch.device) -> Iterator[None]:
    """Everything but the blocks (embeddings, rotary tables, final norm) on ``device`` for the run."""
    home = next(model.parameters()).device
    if home == device:
        yield
        return
    parent_name, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList()
    model.to(device)
    parent._modules[attr] = blocks
    try:
        yield
    finally:
        parent._modules[attr] = nn.ModuleList()
        model.to(home)
        parent._modules[attr] = blocks
