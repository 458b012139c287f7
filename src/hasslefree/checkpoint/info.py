"""Size accounting: bytes on disk of compressed layers vs the dense bf16 layers they replace.

Two independent numbers per layer: *measured* (from the safetensors header) and
*analytic* (kept values × value bytes + index bits / 8 + U, V bytes [+ bias]).
They must agree; a gap means the encoding stores something it should not.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hasslefree.checkpoint.errors import CheckpointError
from hasslefree.checkpoint.files import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint_config, read_safetensors_header
from hasslefree.checkpoint.registry import codec_for_kind
from hasslefree.text_table import format_table

logger = logging.getLogger(__name__)

__all__ = [
    "analytic_linear_bytes",
    "dense_linear_bytes",
    "estimate_compression",
    "checkpoint_info",
    "format_info",
    "info_command",
]

BF16_BYTES = 2


def dense_linear_bytes(out_features: int, in_features: int, bias: bool = False, value_bytes: int = BF16_BYTES) -> int:
    """Bytes of the dense layer being replaced (bf16 by default)."""
    return (out_features * in_features + (out_features if bias else 0)) * value_bytes


def analytic_linear_bytes(
    out_features: int,
    in_features: int,
    pattern: str,
    rank: int,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
    nnz: int | None = None,
) -> float:
    """Predicted stored bytes of one SparseLowRankLinear (``nnz`` needed for unstructured)."""
    meta = {
        "out_features": out_features,
        "in_features": in_features,
        "pattern": pattern,
        "rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
        "bias": bias,
        "nnz": nnz,
    }
    return codec_for_kind("sparse_lowrank_linear").analytic_bytes(meta)


def estimate_compression(
    shapes: Mapping[str, tuple[int, int]], pattern: str, rank: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """Analytic compressed/dense-bf16 ratio per named (out, in) shape and in total, before running anything."""
    per: dict[str, dict[str, float]] = {}
    for name, (out_f, in_f) in shapes.items():
        comp = analytic_linear_bytes(out_f, in_f, pattern, rank, dtype)
        dense = dense_linear_bytes(out_f, in_f)
        per[name] = {"analytic_bytes": comp, "dense_bf16_bytes": dense, "ratio": comp / dense}
    comp_total = sum(v["analytic_bytes"] for v in per.values())
    dense_total = sum(v["dense_bf16_bytes"] for v in per.values())
    return {
        "layers": per,
        "analytic_bytes": comp_total,
        "dense_bf16_bytes": dense_total,
        "ratio": comp_total / dense_total if dense_total else float("nan"),
    }


def checkpoint_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-layer and total sizes of a compressed checkpoint, measured and analytic."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    weights_path = directory / WEIGHTS_NAME
    header = read_safetensors_header(weights_path)
    layers: list[dict[str, Any]] = []
    claimed: set[str] = set()
    for layer in config["layers"]:
        name = layer["name"]
        try:
            codec = codec_for_kind(layer["kind"])
            keys = [f"{name}.{rel}" for rel in codec.tensor_specs(layer)]
            analytic = codec.analytic_bytes(layer)
            out_f, in_f = int(layer["out_features"]), int(layer["in_features"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(directory / CONFIG_NAME, f"layer {name!r}: {exc}") from exc
        missing = [k for k in keys if k not in header]
        if missing:
            raise CheckpointError(weights_path, f"tensor {missing[0]!r} is missing")
        measured = sum(header[k].nbytes for k in keys)
        claimed.update(keys)
        dense = dense_linear_bytes(out_f, in_f, bool(layer.get("bias")))
        layers.append(
            {
                "name": name,
                "kind": layer["kind"],
                "shape": [out_f, in_f],
                **codec.summary(layer),
                "measured_bytes": measured,
                "analytic_bytes": analytic,
                "dense_bf16_bytes": dense,
                "ratio": measured / dense if dense else float("nan"),
            }
        )
    measured_total = sum(x["measured_bytes"] for x in layers)
    analytic_total = sum(x["analytic_bytes"] for x in layers)
    dense_total = sum(x["dense_bf16_bytes"] for x in layers)
    return {
        "directory": str(directory),
        "method": config.get("method"),
        "pattern": config.get("pattern"),
        "dtype": config["dtype"],
        "layers": layers,
        "totals": {
            "measured_bytes": measured_total,
            "analytic_bytes": analytic_total,
            "dense_bf16_bytes": dense_total,
            "ratio": measured_total / dense_total if dense_total else float("nan"),
            "analytic_over_measured": analytic_total / measured_total if measured_total else float("nan"),
            "other_tensor_bytes": sum(e.nbytes for k, e in header.items() if k not in claimed),
            "file_bytes": weights_path.stat().st_size,
        },
    }


def _unit(total: float) -> tuple[str, int]:
    """One unit for the whole table, picked so the total reads comfortably."""
    for name, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if total >= 10 * scale:
            return name, scale
    return "KiB", 2**10


def format_info(info: Mapping[str, Any]) -> str:
    """Plain-text table of :func:`checkpoint_info` output (ratio = stored / dense bf16)."""
    t = info["totals"]
    unit, scale = _unit(t["dense_bf16_bytes"])

    def _mb(n: float) -> str:
        return f"{n / scale:.2f}"

    head = ("layer", "shape", "pattern", "rank", f"stored {unit}", f"analytic {unit}", f"dense bf16 {unit}", "ratio")
    rows = [
        (
            x["name"],
            "x".join(map(str, x["shape"])),
            str(x.get("pattern", "-")),
            str(x.get("rank", "-")),
            _mb(x["measured_bytes"]),
            _mb(x["analytic_bytes"]),
            _mb(x["dense_bf16_bytes"]),
            f"{x['ratio']:.3f}",
        )
        for x in info["layers"]
    ]
    total = ("TOTAL", "", "", "", _mb(t["measured_bytes"]), _mb(t["analytic_bytes"]), _mb(t["dense_bf16_bytes"]),
             f"{t['ratio']:.3f}")
    out = [
        f"{info['directory']}  (dtype {info['dtype']}, method {info.get('method')}, pattern {info.get('pattern')})",
        format_table(head, rows, left=4, footer=[total]),
        f"other tensors (embeddings, norms, uncompressed layers): {_mb(t['other_tensor_bytes'])} {unit}; "
        f"weights file {_mb(t['file_bytes'])} {unit}",
    ]
    return "\n".join(out)


def info_command(directory: str) -> int:
    """CLI body for ``hasslefree info DIR``: table on stdout, problems via logging; returns an exit code."""
    try:
        info = checkpoint_info(directory)
    except CheckpointError as exc:
        logger.error("%s", exc)
        return 1
    sys.stdout.write(format_info(info) + "\n")
    return 0
