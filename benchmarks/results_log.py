"""One place that appends a benchmark record to benchmarks/results/<name>.jsonl.

Every record carries when, where and how it was produced, so numbers in the README can be
traced to the command and the machine.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def append_record(name: str, payload: dict) -> Path:
    """Append ``payload`` plus date, machine, thread count and command line; return the file."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv), **payload}
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path
