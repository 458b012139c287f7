"""Per-block checkpoints so an interrupted run continues where it stopped.

After each block: ``blocks/block_NNNNN.safetensors`` (the block's whole state, compressed
layers included, plus which layers became SparseLowRankLinear) is written to a temp file
and moved into place, then ``progress.json`` (config hash, blocks done, layer records).
A block file without its progress entry is simply recomputed.

Activations are not stored (128 x 2048 x d floats per block would dwarf the model): on
resume the finished blocks are loaded and the calibration data is run through them again,
which reproduces the propagated activations bit for bit on the same device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hasslefree.checkpoint.registry import codec_for_kind, codec_for_module
from hasslefree.nn import replace_linear
from hasslefree.pipeline.matching import MatchRecord
from hasslefree.atomic_files import atomic_write, write_json_atomic
from hasslefree.pipeline.report import LayerRecord

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
BLOCKS_DIR = "blocks"


CODEC_PREFIX = "codec."  # block-checkpoint keys of codec-encoded module tensors


class ResumeMismatch(ValueError):
    """The output directory holds a run with a different configuration."""


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hash of a tensor's bytes (used to fingerprint calibration data and weights)."""
    data = tensor.detach().to("cpu").contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


class ResumeStore:
    """Reads and writes one run's progress in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], config: dict[str, Any], *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only  # the ranks of a distributed run but rank 0: they only read
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self.hash = config_hash(self.config)
        self.progress_path = self.directory / PROGRESS_NAME
        self.layers: list[dict[str, Any]] = []
        self.matching: list[dict[str, Any]] = []
        self.completed = 0

    def start(self, num_blocks: int) -> int:
        """Blocks already finished by an earlier run of the same configuration (0 for a new run)."""
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / BLOCKS_DIR).mkdir(exist_ok=True)
        if not self.progress_path.is_file():
            return 0
        try:
            saved = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeMismatch(f"{self.progress_path} is unreadable ({exc}); delete it to start over") from None
        if saved.get("config_hash") != self.hash:
            changed = sorted(k for k in set(self.config) | set(saved.get("config", {}))
                             if self.config.get(k) != saved.get("config", {}).get(k))
            raise ResumeMismatch(
                f"{self.directory} holds a run with a different configuration (changed: "
                f"{', '.join(changed) or 'unknown'}); use another output directory, or delete "
                f"{self.progress_path} to start over")
        self.completed = int(saved.get("completed_blocks", 0))
        self.layers = list(saved.get("layers", []))
        self.matching = list(saved.get("matching", []))
        if self.completed > num_blocks:
            raise ResumeMismatch(f"{self.progress_path} records {self.completed} blocks but the model has {num_blocks}")
        return self.completed

    def records(self) -> list[LayerRecord]:
        return [LayerRecord.from_dict(r) for r in self.layers]

    def matches(self) -> list[MatchRecord]:
        return [MatchRecord(**m) for m in self.matching]

    def block_path(self, index: int) -> Path:
        return self.directory / BLOCKS_DIR / f"block_{index:05d}.safetensors"

    def save_block(self, index: int, block: nn.Module, layers: dict[str, dict[str, Any]],
                   records: list[LayerRecord], num_blocks: int, match: MatchRecord | None = None) -> None:
        """Write block ``index``, then the progress. Its compressed modules go through their
        checkpoint codecs (the same encodings as the final checkpoint: N:M values + positions,
        HSS factors, ...), keyed ``codec.<layer>.<tensor>``; the rest of the block as it is."""
        self.completed = index + 1
        self.layers.extend(_record_dict(r) for r in records)
        if match is not None:
            self.matching.append(asdict(match))
        if self.read_only:
            return
        state, entries = _encode_block(block, [rel for rel, info in layers.items() if info.get("module")])
        atomic_write(self.block_path(index), lambda tmp: save_file(state, str(tmp), metadata={
            "layers": json.dumps(entries), "config_hash": self.hash}))
        progress = {"config_hash": self.hash, "config": self.config, "num_blocks": num_blocks,
                    "completed_blocks": self.completed, "layers": self.layers}
        if self.matching:
            progress["matching"] = self.matching
        write_json_atomic(self.progress_path, progress)

    def load_block(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s saved state into ``block``, its compressed modules rebuilt by
        their codecs."""
        path = self.block_path(index)
        if not path.is_file():
            raise ResumeMismatch(f"{PROGRESS_NAME} says block {index} is done but {path} is missing; "
                                 f"delete {self.progress_path} to start over")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        if meta.get("config_hash") != self.hash:
            raise ResumeMismatch(f"{path} was written by a run with a different configuration")
        entries = json.loads(meta.get("layers", "{}"))
        if any("kind" not in entry for entry in entries.values()):
            raise ResumeMismatch(f"{path} was written by an older hasslefree; delete {self.progress_path} to start over")
        _decode_block(block, state, entries)


def _encode_block(block: nn.Module, compressed: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors to save, per-layer codec entries): every compressed module encoded by its codec,
    every other tensor of the block under its own name."""
    state: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for relative in compressed:
        module = block.get_submodule(relative)
        codec = codec_for_module(module)
        if codec is None:
            raise TypeError(f"{relative}: no checkpoint codec for {type(module).__name__}")
        tensors, meta = codec.encode(module)
        state.update({f"{CODEC_PREFIX}{relative}.{name}": t for name, t in tensors.items()})
        entries[relative] = {"kind": codec.kind, "meta": meta}
    prefixes = tuple(f"{relative}." for relative in compressed)
    for key, value in block.state_dict().items():
        if not key.startswith(prefixes):
            state[key] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}, entries


def _decode_block(block: nn.Module, state: dict[str, torch.Tensor], entries: dict[str, Any]) -> None:
    """Rebuild the encoded modules into ``block`` and load the rest of ``state`` (a streamed
    block, still on the meta device, takes the stored tensors themselves)."""
    streamed = any(t.is_meta for t in block.state_dict().values())
    for relative, entry in entries.items():
        prefix = f"{CODEC_PREFIX}{relative}."
        tensors = {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        old = block.get_submodule(relative)
        device = next(iter(old.state_dict().values())).device
        module = codec_for_kind(entry["kind"]).decode(tensors, entry["meta"])
        replace_linear(block, relative, module if streamed else module.to(device))
    stray = [k for k in state if k.startswith(CODEC_PREFIX)]
    if stray:
        raise ResumeMismatch(f"block checkpoint holds encoded tensors of no listed layer: {stray[:3]}")
    prefixes = tuple(f"{relative}." for relative in entries)
    missing, unexpected = block.load_state_dict(state, strict=False, assign=streamed)
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ResumeMismatch(f"block checkpoint does not match the block: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def _record_dict(record: LayerRecord) -> dict[str, Any]:
    return asdict(record)
