"""Where the zero-shot data lives, which files each local task reads, and the per-data-folder
task YAMLs lm-eval is given (the shipped definitions in :mod:`hasslefree.zeroshot_tasks` with
their file paths made absolute). Used by :mod:`hasslefree.zeroshot`; needs no lm-eval."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAPER_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "rte", "openbookqa", "boolq")
LOCAL_TASKS = PAPER_TASKS  # defined in hasslefree/zeroshot_tasks on the files of the zero-shot data folder
DATA_FOLDER = "zeroshot"  # the zero-shot data folder's name inside the shared data folder


def tasks_data_dir(tasks_data: str | Path | None = None, tasks: Sequence[str] = ()) -> Path | None:
    """The zero-shot data folder: ``tasks_data`` (that folder itself, or a data folder holding
    ``zeroshot/``; it must exist: the FileNotFoundError names ``tasks``), else ``zeroshot/`` of
    the shared data folder, else None."""
    from hasslefree.loading.paths import find_data_dir

    if tasks_data is not None:
        path = Path(tasks_data).expanduser()
        if not path.is_dir():
            needed = f" (needed by task{'s' if len(tasks) > 1 else ''} {', '.join(map(repr, tasks))})" if tasks else ""
            raise FileNotFoundError(f"zero-shot data folder {path} does not exist{needed}")
        return (path / DATA_FOLDER if (path / DATA_FOLDER).is_dir() else path).resolve()
    root = find_data_dir(required=False)
    folder = root / DATA_FOLDER if root is not None else None
    return folder.resolve() if folder is not None and folder.is_dir() else None


def _where_data_was_looked_for() -> str:
    from hasslefree.loading.paths import DATA_ENV, find_data_dir

    root = find_data_dir(required=False)
    where = f"{root / DATA_FOLDER}, which does not exist" if root is not None else \
        f"shared/data/{DATA_FOLDER}, but there is no shared/data folder"
    return f"looked for {where} (set ${DATA_ENV} or pass --tasks-data DIR)"


def _template(task: str) -> Path:
    from hasslefree.zeroshot_tasks import TEMPLATES

    return TEMPLATES / f"{task}.yaml"


def _file_kwargs(task: str) -> dict[str, Any]:
    """The ``dataset_kwargs`` of a shipped task YAML (every string in it a file path relative
    to the data folder), read without resolving its ``!function`` tags."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(_template(task).read_text(encoding="utf-8"), Loader=Loader)["dataset_kwargs"]  # noqa: S506


def _map_strings(value: Any, function: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, function) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, function) for v in value]
    return function(value) if isinstance(value, str) else value


def local_task_files(task: str, data_dir: str | Path) -> list[Path]:
    """The files the local task ``task`` reads inside ``data_dir``."""
    files: list[Path] = []
    _map_strings(_file_kwargs(task), lambda rel: files.append(Path(data_dir) / rel))
    return files


def check_local_data(task: str, data_dir: str | Path | None) -> None:
    """A one-line FileNotFoundError naming the task and the folder when the data folder or one
    of the task's files is missing."""
    if data_dir is None:
        raise FileNotFoundError(f"no zero-shot data folder for task {task!r}: {_where_data_was_looked_for()}")
    missing = [str(p.relative_to(data_dir)) for p in local_task_files(task, data_dir) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"task {task!r}: {', '.join(missing)} missing from the zero-shot data folder "
                                f"{data_dir}")


_FOLDERS: dict[Path, tempfile.TemporaryDirectory] = {}


def local_task_folder(data_dir: str | Path) -> Path:
    """A folder of one YAML per local task that includes the shipped definition and sets its
    ``dataset_kwargs`` to the absolute paths under ``data_dir`` (lm-eval would take relative
    data files from the working directory). Written once per data folder and process; removed
    when the interpreter exits."""
    import yaml

    data_dir = Path(data_dir).resolve()
    if data_dir not in _FOLDERS:
        folder = tempfile.TemporaryDirectory(prefix="hasslefree-zeroshot-tasks-")
        for task in LOCAL_TASKS:
            config = {"include": str(_template(task)),
                      "dataset_kwargs": _map_strings(_file_kwargs(task), lambda rel: str(data_dir / rel))}
            header = f"# lm-eval task {task} on the files in {data_dir}, written by hasslefree.zeroshot\n"
            (Path(folder.name) / f"{task}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False),
                                                             encoding="utf-8")
        _FOLDERS[data_dir] = folder
    return Path(_FOLDERS[data_dir].name)


def written_task_folders() -> list[str]:
    """The folders :func:`local_task_folder` has written in this process."""
    return [folder.name for folder in _FOLDERS.values()]
