"""The pipeline across processes (``torchrun``; gloo on CPUs, NCCL on GPUs).

Data-parallel calibration: each rank holds every world-th calibration batch, runs
the block passes on it and keeps its own propagated activations; every group's Hessian is the
float64 sum of xᵀx and the token count over all ranks, so each rank solves with the H one
process would get. Layer-parallel decomposition: a group's layers go to owner ranks by
modelled cost (largest first, to the least loaded rank); each owner solves its layers and
broadcasts the results, so every rank builds the same compressed block whoever solved what.
Block-output matching runs data-parallel too: each optimiser step sums the gradients of one
batch (``accumulate`` batches) per rank, which is the one-process run with ``accumulate x
world`` batches per step. A rank that raises while solving makes every rank stop at the next collective with a message
naming it and the block; a rank that dies ends the job through torchrun or, at the latest,
through the collectives' timeout.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hasslefree.hessian import HessianAccumulator
from hasslefree.pipeline.plan import TargetLayer

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class RankFailure(RuntimeError):
    """A rank of a distributed run failed; raised on every rank."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; the default (rank 0 of 1) is a plain one-process run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collective buffers live (cuda for NCCL)

    @classmethod
    def current(cls) -> Ranks:
        """The initialised default process group's ranks, or one process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def several(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes checkpoints, the report and the model (rank 0 only)."""
        return self.rank == 0

    def shard(self, batches: Sequence[T]) -> list[T]:
        """This rank's share of the calibration batches: every ``world``-th one from ``rank``, so
        a matching step over one batch per rank covers consecutive batches (see :meth:`in_order`)."""
        if len(batches) < self.world:
            raise ValueError(f"{len(batches)} calibration batch(es) cannot feed {self.world} processes: give at least "
                             "one batch per process (more --nsamples or a smaller --batch-size)")
        return list(batches[self.rank::self.world])

    def in_order(self, values: Sequence[float], what: str) -> list[float]:
        """One value per local batch, from every rank, in the global batch order (so a sum over
        them adds in the same order as one process would)."""
        if not self.several:
            return list(values)
        gathered: list[Any] = [None] * self.world
        self._collective(lambda: dist.all_gather_object(gathered, list(values)), what)
        return [gathered[i % self.world][i // self.world] for i in range(sum(len(g) for g in gathered))]

    def sum_gradients(self, params: Sequence[torch.Tensor], what: str) -> None:
        """Each gradient summed over the ranks, in place, in one collective (a rank without a
        batch this step adds zeros)."""
        if not self.several:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self._collective(lambda: dist.all_reduce(flat), what)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).to(p.device)

    def most(self, value: int, what: str) -> int:
        """The largest ``value`` over the ranks."""
        return self._max([value], what)[0]

    def agree(self, value: int, what: str) -> int:
        """``value``, checked to be the same on every rank."""
        high, low = self._max([value, -value], what)
        if high != -low:
            raise RankFailure(f"the ranks disagree on {what} ({-low} to {high}); the output directory "
                              "must be one file system that every host sees")
        return value

    def sum_hessians(self, accumulators: Sequence[HessianAccumulator], where: str) -> None:
        """Every accumulator's sum and token count over all ranks, in place."""
        if not self.several:
            return
        tokens = torch.tensor([acc.tokens for acc in accumulators], dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.all_reduce(tokens), f"{where}: the token counts")
        for acc, count in zip(accumulators, tokens.tolist()):
            total = acc.total.to(self.device)
            self._collective(lambda: dist.all_reduce(total), f"{where}: the Hessian sum")
            acc.merge_from(total.to(acc.total.device), count)

    def solve(self, targets: Sequence[TargetLayer], fit: Callable[[list[TargetLayer]], dict[TargetLayer, Any]],
              result_device: torch.device, where: str,
              stage: Callable[[str], contextlib.AbstractContextManager] | None = None) -> dict[TargetLayer, Any]:
        """``fit`` on this rank's share of ``targets`` (timed as stage "decompose"), then every
        result on every rank (stage "communicate")."""
        stage = stage or (lambda _name: contextlib.nullcontext())
        if not self.several:
            with stage("decompose"):
                return fit(list(targets))
        owners = assign_owners([layer_cost(t) for t in targets], self.world)
        mine = [t for t, owner in zip(targets, owners) if owner == self.rank]
        error: BaseException | None = None
        results: dict[TargetLayer, Any] = {}
        try:
            with stage("decompose"):
                results = fit(mine) if mine else {}
        except Exception as exc:  # shared below, so the other ranks stop too instead of waiting
            error = exc
            logger.error("rank %d failed in %s: %s", self.rank, where, exc)
        with stage("communicate"):
            return self._share(results, targets, owners, error, result_device, where)

    def _share(self, results: dict[TargetLayer, Any], targets: Sequence[TargetLayer], owners: list[int],
               error: BaseException | None, result_device: torch.device, where: str) -> dict[TargetLayer, Any]:
        failed = self.most(self.rank if error is not None else -1, f"{where}: the status exchange")
        if error is not None:
            raise RankFailure(f"rank {self.rank} failed in {where}: {error}") from error
        if failed >= 0:
            raise RankFailure(f"rank {failed} failed in {where}; rank {self.rank} stops too")
        return {t: self._broadcast(results.get(t), owner, result_device, f"{where}: {t.name} from rank {owner}")
                for t, owner in zip(targets, owners)}

    def _broadcast(self, result: Any, owner: int, device: torch.device, what: str) -> Any:
        """One layer result from its owner to every rank: its tensors as tensors, the rest pickled."""
        header: list[Any] = [None, None]
        if self.rank == owner:
            tensors = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                       if isinstance(getattr(result, f.name), torch.Tensor)}
            modules = {f.name: copy.deepcopy(getattr(result, f.name)).to("cpu") for f in dataclasses.fields(result)
                       if isinstance(getattr(result, f.name), nn.Module)}
            skeleton = dataclasses.replace(result, **{name: None for name in tensors}, **modules)
            header = [skeleton, [(name, t.shape, t.dtype) for name, t in tensors.items()]]
        self._collective(lambda: dist.broadcast_object_list(header, src=owner, device=self.device), what)
        skeleton, layout = header
        filled: dict[str, Any] = {}
        for name, shape, dtype in layout:
            buffer = (getattr(result, name).to(self.device).contiguous() if self.rank == owner  # views travel as rows
                      else torch.empty(shape, dtype=dtype, device=self.device))
            self._collective(lambda: dist.broadcast(buffer, src=owner), what)
            filled[name] = buffer.to(device)
        for f in dataclasses.fields(skeleton):
            if isinstance(getattr(skeleton, f.name), nn.Module):
                filled[f.name] = getattr(skeleton, f.name).to(device)
        return result if self.rank == owner else dataclasses.replace(skeleton, **filled)

    def _max(self, values: list[int], what: str) -> list[int]:
        """Element-wise maximum of integer ``values`` over the ranks."""
        if not self.several:
            return values
        found = torch.tensor(values, dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.all_reduce(found, op=dist.ReduceOp.MAX), what)
        return found.tolist()

    def _collective(self, call: Callable[[], Any], what: str) -> None:
        try:
            call()
        except RuntimeError as exc:  # a timeout or a closed connection: a peer died or hangs
            raise RankFailure(f"rank {self.rank}: {what} failed ({str(exc).splitlines()[0]}); "
                              "another rank probably died or hangs") from exc


def layer_cost(target: TargetLayer) -> float:
    """Modelled solve time of one layer: the sparse step's passes (out x in²) plus the one-time
    factorisation of H (in³, weighted by the ratio seen at Llama-3-8B shapes on a CPU)."""
    return shape_cost(target.out_features, target.in_features)


def shape_cost(out_features: int, in_features: int) -> float:
    n, d = out_features, in_features
    return float(n * d * d + d ** 3 / 16)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank per item: largest first, each to the least loaded rank (ties to the lowest)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_process_group(device: torch.device | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join torchrun's job (NCCL for CUDA, else gloo); return this rank's compute device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR); launch "
                         "with: torchrun --nproc-per-node N -m hasslefree compress ...")
    if timeout_s <= 0:
        raise ValueError(f"the distributed timeout must be positive, got {timeout_s}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def end_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
