"""One rank of the distributed tests (or, started without torchrun, the one-process reference).

    torchrun --standalone --nproc-per-node 2 distributed_worker.py --model llama --out DIR
    python distributed_worker.py --model llama --out DIR          # the same run in one process

Faults for the failure tests: ``--raise-at RANK:BLOCK`` makes that rank raise while solving
the block's layers, ``--die-at RANK:BLOCK`` kills that rank there, and ``--stop-after BLOCK``
kills rank 0 once the block is checkpointed (a run killed mid-way, to be resumed); ``--stream
DIR`` reads the blocks of a saved tiny Llama one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers

from helpers import tiny_llama, token_batch  # noqa: E402

from hasslefree.pipeline import compress  # noqa: E402
from hasslefree.pipeline import layer_methods  # noqa: E402
from hasslefree.pipeline.distributed import Ranks, end_process_group, launched_by_torchrun, start_process_group  # noqa: E402


def _fault(value: str | None) -> tuple[int, int] | None:
    return tuple(int(v) for v in value.split(":")) if value else None  # type: ignore[return-value]


def _inject(raise_at: tuple[int, int] | None, die_at: tuple[int, int] | None, rank: int) -> None:
    fit = layer_methods.SparseLowRankMethod.fit

    def faulty(self, block, targets, *args, **kwargs):
        here = (rank, targets[0].block)
        if here == raise_at:
            raise ArithmeticError("injected fault")
        if here == die_at:
            os._exit(7)
        return fit(self, block, targets, *args, **kwargs)

    layer_methods.SparseLowRankMethod.fit = faulty


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("llama", "stories260K"), default="llama")
    parser.add_argument("--stream", type=Path, help="read the tiny Llama's blocks one at a time from this HF folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="hassle-free-fast")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--no-true-sequential", action="store_true")
    parser.add_argument("--match-accumulate", type=int, help="block-output matching, 1 epoch, this many batches a step")
    parser.add_argument("--raise-at")
    parser.add_argument("--die-at")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if launched_by_torchrun():
        start_process_group(torch.device("cpu"), args.timeout)
    rank = Ranks.current().rank
    _inject(_fault(args.raise_at), _fault(args.die_at), rank)
    weights = None
    if args.stream:
        from hasslefree.loading import open_streaming

        (model, weights), calibration = open_streaming(args.stream), token_batch(args.windows, 32)
    elif args.model == "llama":
        model, calibration = tiny_llama(num_hidden_layers=3), token_batch(args.windows, 32)
    else:
        from hasslefree.calibration import calibration_batch
        from hasslefree.loading import find_data_file, load_model

        model, tok = load_model("stories260K")
        text = find_data_file("text", "tinystories.validation-head.txt")
        calibration = calibration_batch(tok, str(text), args.windows, 64, 0)

    def stop(index: int, _records) -> None:
        if index == args.stop_after and rank == 0:
            os._exit(9)

    if args.method.startswith("shss"):  # HSS layers travel between ranks as pickled modules
        settings = dict(method=args.method, hss={"sparsity": 0.3, "outer_rank": 8, "leaf": 16})
    else:
        settings = dict(pattern="2:4", rank=8, method=args.method, iterations=3)
    if args.match_accumulate:
        settings["match"] = {"epochs": 1, "lr": 1e-4, "target": "model", "accumulate": args.match_accumulate}
    compress(model, calibration=calibration, out_dir=args.out, progress=False, on_block_end=stop,
             true_sequential=not args.no_true_sequential, block_weights=weights, **settings)
    end_process_group()


if __name__ == "__main__":
    main()
