"""Zero-shot accuracy through lm-evaluation-harness (the optional ``zeroshot`` extra).

The papers' protocol: 0-shot, ``acc_norm`` where a task reports it, else ``acc``, and the
plain mean over tasks — usually piqa, hellaswag, arc_easy, arc_challenge, winogrande, rte,
openbookqa and boolq (:data:`PAPER_TASKS`). An already-loaded model (dense or compressed) is
wrapped in lm-eval's ``HFLM`` as it is: nothing is reloaded from the hub.

Those eight tasks read local files (:data:`LOCAL_TASKS`): their definitions ship in
:mod:`hasslefree.zeroshot_tasks` under lm-eval's standard names, with the standard prompts,
choices, targets and metrics, and take precedence over lm-eval's hub-backed tasks. Their data
folder is ``zeroshot/`` of the shared data folder (found by
:func:`hasslefree.loading.find_data_dir`: ``$HASSLEFREE_DATA``, else ``shared/data`` above the
working directory or the package), or the folder passed as ``tasks_data``. Task definitions
under ``include_path`` override both these and lm-eval's.

lm-eval is imported only inside these functions, so the rest of hasslefree never needs it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hasslefree.cpu_bf16 import bf16_products_in_float32
from hasslefree.text_table import format_table
from hasslefree.zeroshot_files import (DATA_FOLDER, LOCAL_TASKS, PAPER_TASKS, check_local_data, local_task_files,
                                       local_task_folder, tasks_data_dir, written_task_folders)

__all__ = ["AVERAGE", "DATA_FOLDER", "LOCAL_TASKS", "PAPER_TASKS", "ZeroShotRow", "check_local_data", "format_rows",
           "local_task_files", "local_task_folder", "require_lm_eval", "task_manager", "tasks_data_dir", "zero_shot",
           "zero_shot_rows"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hasslefree[zeroshot]'"
AVERAGE = "average"

PathList = str | Path | Sequence[str | Path] | None


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


# ---------------------------------------------------------------- the task manager


def task_manager(tasks: Sequence[str], include_path: PathList = None, tasks_data: str | Path | None = None) -> Any:
    """An lm-eval TaskManager that knows every name in ``tasks``: a ValueError naming close
    matches for unknown ones, then a FileNotFoundError for a local task (:data:`LOCAL_TASKS`)
    whose data folder or files are missing. Loads no model and no dataset.

    The local tasks are defined on the zero-shot data folder (:func:`tasks_data_dir` of
    ``tasks_data``); tasks under ``include_path`` (folders or YAML files) override them."""
    require_lm_eval()
    names = list(tasks)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"expected a non-empty list of task names, got {tasks!r}")
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"task path {path} does not exist")
    data_dir = tasks_data_dir(tasks_data, [n for n in names if n in LOCAL_TASKS])
    local = [local_task_folder(data_dir)] if data_dir is not None else []
    manager = _manager(tuple(str(Path(p).resolve()) for p in [*local, *paths]))  # later ones take precedence
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hints.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
        where = f" (searched lm-eval's tasks and {', '.join(map(str, paths))})" if paths else ""
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {'; '.join(hints)}{where}")
    for name in names:
        if name in LOCAL_TASKS and not _defined_under(manager, name, paths):
            check_local_data(name, data_dir)
    return manager


def _defined_under(manager: Any, name: str, paths: Sequence[str | Path]) -> bool:
    """Whether the task ``name`` that ``manager`` builds comes from one of ``paths``."""
    where = getattr(manager.task_index.get(name), "yaml_path", None)
    if where is None:
        return False
    where = Path(where).resolve()
    return any(where == p or p in where.parents for p in (Path(p).resolve() for p in paths))


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``parts``."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


@contextlib.contextmanager
def _dropped(logger_name: str, *parts: str) -> Iterator[None]:
    target = logging.getLogger(logger_name)
    drop = _DropMessages(*parts)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...]) -> Any:
    """Indexing every lm-eval task takes seconds: one TaskManager per set of include paths.
    lm-eval's warning that each local task overrides the standard one is expected, so dropped."""
    from lm_eval.tasks import TaskManager

    with _dropped("lm_eval.tasks._index", *written_task_folders()):
        return TaskManager(include_path=list(paths) or None)


# ---------------------------------------------------------------- evaluation


def zero_shot_rows(model: Any, tokenizer: Any, tasks: Sequence[str], *, batch_size: int | str = 1,
                   limit: int | float | None = None, device: str | Any | None = None,
                   include_path: PathList = None, tasks_data: str | Path | None = None) -> list[ZeroShotRow]:
    """One row per evaluated task (a group's subtasks each get one; a group with its own
    aggregate gets one too): ``acc_norm`` where reported, else ``acc``."""
    manager = task_manager(tasks, include_path, tasks_data)
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
    # piqa and winogrande load through custom_dataset, which lm-eval always warns about
    with _dropped("lm_eval.api.task", *(f"{name}: Custom kwargs can be passed" for name in LOCAL_TASKS)), \
            bf16_products_in_float32():
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
              include_path: PathList = None, tasks_data: str | Path | None = None) -> dict[str, float]:
    """0-shot accuracy per task (``acc_norm`` where present, else ``acc``; fractions) plus
    ``"average"``, the unweighted mean over the tasks that are not groups.

    ``model``/``tokenizer``: a loaded causal LM and its tokenizer (e.g. from
    :func:`hasslefree.evaluate.load_any`); ``device`` moves the model there first, otherwise
    it runs where it is. ``limit``: at most this many examples per task (or a fraction).
    ``include_path``: folder(s) or YAML file(s) of extra lm-eval tasks (they override others of
    the same name). ``tasks_data``: the zero-shot data folder of the local :data:`LOCAL_TASKS`
    (default: ``zeroshot/`` of the shared data folder). Unknown task names, missing local data
    and a missing lm-eval raise before anything is evaluated.
    """
    rows = zero_shot_rows(model, tokenizer, tasks, batch_size=batch_size, limit=limit, device=device,
                          include_path=include_path, tasks_data=tasks_data)
    scores = {r.task: r.accuracy for r in rows}
    leaves = [r.accuracy for r in rows if r.samples]
    if leaves:
        scores[AVERAGE] = sum(leaves) / len(leaves)
    return scores


def format_rows(rows: Sequence[ZeroShotRow]) -> str:
    """The zero-shot table of ``hasslefree eval``: accuracy in percent, then the average."""
    cells = [(r.task, r.metric, r.samples or "", f"{100 * r.accuracy:.2f}") for r in rows]
    leaves = [r.accuracy for r in rows if r.samples]
    if leaves:
        cells.append((AVERAGE, "", "", f"{100 * sum(leaves) / len(leaves):.2f}"))
    return format_table(("task", "metric", "samples", "accuracy %"), cells)
