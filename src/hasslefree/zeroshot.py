"""Zero-shot accuracy through lm-evaluation-harness (the optional ``zeroshot`` extra).

The papers' protocol: 0-shot, ``acc_norm`` where a task reports it, else ``acc``, and the
plain mean over tasks — usually piqa, hellaswag, arc_easy, arc_challenge, winogrande, rte,
openbookqa and boolq (:data:`PAPER_TASKS`). An already-loaded model (dense or compressed) is
wrapped in lm-eval's ``HFLM`` as it is: nothing is reloaded from the hub, although the
tasks' datasets are, unless ``include_path`` points at local task YAMLs whose data is local.

lm-eval is imported only inside these functions, so the rest of hasslefree never needs it.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PAPER_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "rte", "openbookqa", "boolq")
INSTALL_HINT = "pip install 'hasslefree[zeroshot]'"
AVERAGE = "average"


@dataclass(frozen=True)
class ZeroShotRow:
    task: str
    metric: str  # "acc_norm" or "acc"
    samples: int  # examples scored; 0 for a group's aggregate
    accuracy: float  # a fraction in [0, 1]


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ImportError that names the extra to install."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from exc
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None) -> Any:
    """An lm-eval TaskManager that knows every name in ``tasks``; a ValueError naming close
    matches for unknown ones. Loads no model and no dataset."""
    require_lm_eval()
    names = list(tasks)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"expected a non-empty list of task names, got {tasks!r}")
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"task path {path} does not exist")
    manager = _manager(tuple(str(Path(p).resolve()) for p in paths))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hints.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
        where = f" (searched lm-eval's tasks and {', '.join(map(str, paths))})" if paths else ""
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {'; '.join(hints)}{where}")
    return manager


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...]) -> Any:
    """Indexing every lm-eval task takes seconds: one TaskManager per set of include paths."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


def zero_shot_rows(model: Any, tokenizer: Any, tasks: Sequence[str], *, batch_size: int | str = 1,
                   limit: int | float | None = None, device: str | Any | None = None,
                   include_path: str | Path | Sequence[str | Path] | None = None) -> list[ZeroShotRow]:
    """One row per evaluated task (a group's subtasks each get one; a group with its own
    aggregate gets one too): ``acc_norm`` where reported, else ``acc``."""
    manager = task_manager(tasks, include_path)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    hf_logger = logging.getLogger(HFLM.__module__)
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warnings about being handed a model object are expected here
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                          log_samples=False)
    groups = {name for name, subtasks in (out.get("group_subtasks") or {}).items() if subtasks}
    rows = []
    for name, metrics in out["results"].items():
        metric = next((m for m in ("acc_norm", "acc") if f"{m},none" in metrics), None)
        if metric is None:
            if name not in groups:
                logger.warning("%s reports neither acc_norm nor acc (only %s): left out", name,
                               ", ".join(k for k in metrics if "," in k and "_stderr" not in k))
            continue
        samples = int((out.get("n-samples") or {}).get(name, {}).get("effective", 0))
        rows.append(ZeroShotRow(name, metric, samples, float(metrics[f"{metric},none"])))
    return rows


def zero_shot(model: Any, tokenizer: Any, tasks: list[str], *, batch_size: int | str = 1,
              limit: int | float | None = None, device: str | Any | None = None,
              include_path: str | Path | Sequence[str | Path] | None = None) -> dict[str, float]:
    """0-shot accuracy per task (``acc_norm`` where present, else ``acc``; fractions) plus
    ``"average"``, the unweighted mean over the tasks that are not groups.

    ``model``/``tokenizer``: a loaded causal LM and its tokenizer (e.g. from
    :func:`hasslefree.evaluate.load_any`); ``device`` moves the model there first, otherwise
    it runs where it is. ``limit``: at most this many examples per task (or a fraction).
    ``include_path``: folder(s) or YAML file(s) of extra lm-eval tasks. Unknown task names and
    a missing lm-eval raise before anything is evaluated.
    """
    rows = zero_shot_rows(model, tokenizer, tasks, batch_size=batch_size, limit=limit, device=device,
                          include_path=include_path)
    scores = {r.task: r.accuracy for r in rows}
    leaves = [r.accuracy for r in rows if r.samples]
    if leaves:
        scores[AVERAGE] = sum(leaves) / len(leaves)
    return scores


def format_rows(rows: Sequence[ZeroShotRow]) -> str:
    """The zero-shot table of ``hasslefree eval``: accuracy in percent, then the average."""
    from hasslefree.evaluate import format_table

    cells = [(r.task, r.metric, r.samples or "", f"{100 * r.accuracy:.2f}") for r in rows]
    leaves = [r.accuracy for r in rows if r.samples]
    if leaves:
        cells.append((AVERAGE, "", "", f"{100 * sum(leaves) / len(leaves):.2f}"))
    return format_table(("task", "metric", "samples", "accuracy %"), cells)
