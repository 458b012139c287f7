"""The pipeline across processes: torchrun with gloo, 2 processes of one thread each, against
the same run in one process (``distributed_worker.py``).

Bit-for-bit equality is expected, not just closeness: every rank runs the same per-window
block passes as one process, each group's Hessian is a float64 sum of the same per-batch
float32 xᵀx (so the order of the partial sums is lost in the cast back to float32), and the
layer solves do not depend on which other layers share their call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import stories_text, tiny_llama
from hasslefree.pipeline.distributed import Ranks, assign_owners

WORKER = Path(__file__).with_name("distributed_worker.py")
LIMIT_S = 240  # a launch takes ~10 s on 2 cores; a hang would be a failure, not a wait


def _run(out: Path, *flags: str, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(WORKER), "--out", str(out), *flags], capture_output=True, text=True,
                          timeout=LIMIT_S, env=env)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_outputs(a: Path, b: Path) -> None:
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and len(sa) > 10
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    la, lb = (json.loads((d / "report.json").read_text())["layers"] for d in (a, b))
    assert [(r["name"], r["relative_objective"]) for r in la] == [(r["name"], r["relative_objective"]) for r in lb]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny Llama (3 blocks) compressed in one process."""
    out = tmp_path_factory.mktemp("one") / "out"
    _ok(_run(out, processes=1))
    return out


def test_owners_go_largest_first_to_the_least_loaded_rank():
    assert assign_owners([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]  # 5 | 3, then 3 to rank 1, 1 to rank 0
    assert assign_owners([2.0, 2.0, 2.0], 3) == [0, 1, 2]
    assert assign_owners([4.0], 3) == [0]
    costs = [float(c) for c in (9, 7, 6, 5, 4, 3, 3, 2)]
    owners = assign_owners(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs) and sorted(set(owners)) == [0, 1, 2]


def test_shards_interleave_and_cover_every_batch_once():
    batches = list(range(7))
    shards = [Ranks(rank, 3).shard(batches) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="2 calibration batch.*3 processes"):
        Ranks(0, 3).shard([0, 1])


def test_two_processes_give_the_one_process_model_bit_for_bit(reference, tmp_path):
    _ok(_run(tmp_path / "two"))
    _assert_same_outputs(reference, tmp_path / "two")
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["timings"]["communicate"] > 0


def test_stories260k_across_processes_with_oats_and_all_groups_at_once(tmp_path):
    stories_text()  # the shared data must be there
    flags = ("--model", "stories260K", "--method", "oats", "--no-true-sequential", "--windows", "5")
    _ok(_run(tmp_path / "one", *flags, processes=1))
    _ok(_run(tmp_path / "two", *flags))
    _assert_same_outputs(tmp_path / "one", tmp_path / "two")


def test_hss_layers_across_processes(tmp_path):
    _ok(_run(tmp_path / "one", "--method", "shss-whitened", processes=1))
    _ok(_run(tmp_path / "two", "--method", "shss-whitened"))
    _assert_same_outputs(tmp_path / "one", tmp_path / "two")


def test_matching_across_two_processes_is_one_process_with_two_batches_a_step(tmp_path):
    """Each step sums one batch's gradient per rank: batches 2k and 2k+1, as one process with
    accumulate=2 does, and a sum of two terms does not depend on their order."""
    _ok(_run(tmp_path / "one", "--match-accumulate", "2", processes=1))
    _ok(_run(tmp_path / "two", "--match-accumulate", "1"))
    _assert_same_outputs(tmp_path / "one", tmp_path / "two")
    matching = json.loads((tmp_path / "two" / "report.json").read_text())["matching"]
    assert len(matching) == 3 and all(m["steps"] == 3 for m in matching)
    assert all(m["kept"] and m["loss_after"] < m["loss_before"] for m in matching)


def test_streamed_blocks_per_rank_give_the_same_model(reference, tmp_path):
    tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "hf")  # the reference's model, on disk
    _ok(_run(tmp_path / "two", "--stream", str(tmp_path / "hf")))
    _assert_same_outputs(reference, tmp_path / "two")


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_killed_run_resumes_with_another_world_size(reference, tmp_path, first, then):
    killed = _run(tmp_path / "run", "--stop-after", "0", processes=first)
    assert killed.returncode != 0
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["completed_blocks"] == 1
    _ok(_run(tmp_path / "run", processes=then))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["resumed_blocks"] == 1
    _assert_same_outputs(reference, tmp_path / "run")


def test_a_rank_that_raises_stops_every_rank_naming_it_and_the_block(tmp_path):
    began = time.monotonic()
    result = _run(tmp_path / "run", "--raise-at", "1:1")
    assert result.returncode != 0 and time.monotonic() - began < 60
    assert "rank 1 failed in block 1: injected fault" in result.stderr
    assert "rank 1 failed in block 1; rank 0 stops too" in result.stderr
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["completed_blocks"] == 1


def test_a_rank_that_dies_ends_the_job_promptly(tmp_path):
    began = time.monotonic()
    result = _run(tmp_path / "run", "--die-at", "1:1", "--timeout", "20")
    assert result.returncode != 0 and time.monotonic() - began < 60
    assert "exitcode  : 7" in result.stderr  # torchrun's report names the rank that died
    # the survivor names the block when it sees the broken collective before torchrun stops it
    # (under load torchrun may end it first, so only its message, when there, is checked)
    if "another rank probably died" in result.stderr:
        assert "block 1" in result.stderr


def test_the_command_line_under_torchrun_matches_one_process(tmp_path):
    text = stories_text()
    flags = ["compress", "stories260K", "--calib", text, "--nsamples", "4", "--seqlen", "64", "--rank", "8",
             "--iterations", "2", "--method", "hassle-free-fast", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node=2"])):
        done = subprocess.run([*launcher, "-m", "hasslefree", *flags, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=LIMIT_S, env=env)
        _ok(done)
        assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    _assert_same_outputs(tmp_path / "one", tmp_path / "two")
