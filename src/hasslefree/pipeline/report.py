"""The run report: per-layer error, budget, time and memory; per-stage timings; a plot.

Relative objectives are f/f(0) = tr(E H Eᵀ)/tr(W H Wᵀ) on the calibration Hessian the
layer saw, for the returned (best) iterate and for the first one (history[0]), so the gain
of alternating is visible layer by layer. history[0] is scored after the first full
iteration: pruning alone for pruning-only methods, prune + one low-rank fit otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hasslefree.atomic_files import write_json_atomic
from hasslefree.stage_clock import timed

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
PLOT_NAME = "report.png"
STAGES = ("capture", "resume", "hessian", "decompose", "communicate", "apply", "match", "propagate", "checkpoint")


@dataclass
class LayerRecord:
    """What happened to one layer."""

    name: str
    block: int
    shape: tuple[int, int]
    pattern: str
    rank: int
    method: str
    parameters: int
    dense_parameters: int
    relative_objective: float
    first_iterate_relative_objective: float
    iterations: int
    best_iteration: int
    seconds: float
    peak_rss_mb: float
    cuda_peak_mb: float | None = None
    # the same f/f(0) under the damped H (H + λI [+ c·diag H]) that the solvers minimise
    damped_relative_objective: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerRecord":
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


@dataclass
class CompressionReport:
    """Everything a run measured; ``to_json``/``save`` write it, ``plot`` draws the errors."""

    model: str
    architecture: str
    config: dict[str, Any]
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    resumed_blocks: int = 0
    peak_rss_mb: float = 0.0
    cuda_peak_mb: float | None = None
    matching: list[dict[str, Any]] = field(default_factory=list)  # per block, when block-output matching ran
    recipe: dict[str, Any] | None = None  # the run's Recipe.to_dict(): rerun it with --recipe report.json
    # bf16 activations on the CPU: "float32" when the block forwards computed their products in
    # float32 (hasslefree.cpu_bf16: no native bf16 here), "native" otherwise; None for other runs
    bf16_products: str | None = None

    @property
    def parameters(self) -> int:
        return sum(r.parameters for r in self.layers)

    @property
    def dense_parameters(self) -> int:
        return sum(r.dense_parameters for r in self.layers)

    def summary(self) -> str:
        """A few lines for logs and the CLI."""
        if not self.layers:
            return "no layers compressed"
        errors = [r.relative_objective for r in self.layers]
        ratio = self.parameters / max(self.dense_parameters, 1)
        total = self.timings.get("total", sum(self.timings.values()))
        return (f"{len(self.layers)} layers: parameters {self.parameters:,} / {self.dense_parameters:,} dense "
                f"({ratio:.3f}); relative error mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}; "
                f"{total:.1f} s; peak RSS {self.peak_rss_mb:.0f} MB"
                + (f"; bf16 products {self.bf16_products}" if self.bf16_products else ""))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameters"] = self.parameters
        data["dense_parameters"] = self.dense_parameters
        return data

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / REPORT_NAME
        write_json_atomic(path, self.to_json())
        return path

    def plot(self, path: str | os.PathLike[str]) -> Path | None:
        """PNG of per-layer relative error (returned and first iterate), log scale."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed: no plot written")
            return None
        if not self.layers:
            return None
        xs = range(len(self.layers))
        fig, ax = plt.subplots(figsize=(max(6.0, len(self.layers) * 0.08), 4.0))
        ax.plot(xs, [max(r.first_iterate_relative_objective, 1e-12) for r in self.layers], ".-", lw=0.8,
                label="first iterate")
        ax.plot(xs, [max(r.relative_objective, 1e-12) for r in self.layers], ".-", lw=0.8, label="result")
        ax.set_yscale("log")
        ax.set_xlabel("layer (in pipeline order)")
        ax.set_ylabel("relative error f / f(0)")
        ax.set_title(f"{self.model}: {self.config.get('method')} {self.config.get('pattern')} "
                     f"rank {self.config.get('rank')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


class StageTimer:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {stage: 0.0 for stage in STAGES}
        self.decompose_parts: dict[str, float] = {}  # inside "decompose": prepare, P1, P2, objective
        self._began = time.perf_counter()

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        return timed(self.seconds, name)

    def summary(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in self.seconds.items()},
                **{f"decompose.{k}": round(v, 4) for k, v in self.decompose_parts.items()},
                "total": round(time.perf_counter() - self._began, 4)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cuda_peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
