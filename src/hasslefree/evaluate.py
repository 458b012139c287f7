"""Load a dense or compressed model by one name, and tabulate its perplexities.

Shared by ``hasslefree eval`` and the demo so both report numbers the same way: the
SparseGPT protocol of :mod:`hasslefree.perplexity`, optionally on the first N windows;
``hasslefree eval --tasks`` adds zero-shot accuracies (:mod:`hasslefree.zeroshot`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasslefree.data import eval_max_windows, eval_tokens
from hasslefree.perplexity import perplexity
from hasslefree.text_table import format_table

logger = logging.getLogger(__name__)

CHECKPOINT_CONFIG = "hasslefree_config.json"


@dataclass(frozen=True)
class PerplexityRow:
    dataset: str
    seqlen: int
    windows: int
    perplexity: float
    seconds: float


def is_compressed_dir(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / CHECKPOINT_CONFIG).is_file()


def load_any(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             tokenizer: str | None = None) -> tuple[nn.Module, Any]:
    """A compressed checkpoint directory (via hasslefree.checkpoint) or anything load_model takes."""
    from hasslefree.loading import load_model

    if not is_compressed_dir(spec):
        model, tok = load_model(str(spec), dtype=dtype, device=device)
        return model, (_tokenizer_from(tokenizer) if tokenizer else tok)
    from hasslefree.checkpoint import load_compressed
    from hasslefree.checkpoint.files import read_checkpoint_config

    # evaluated in dtype, whatever it was saved in; dense storage: the fastest form for long windows
    model = load_compressed(spec, device=device, packed=False).to(dtype)
    if tokenizer:
        return model, _tokenizer_from(tokenizer)
    source = (read_checkpoint_config(Path(spec)).get("run_config") or {}).get("model")
    return model, _checkpoint_tokenizer(Path(spec), source)


def _tokenizer_from(spec: str) -> Any:
    """The tokenizer of whatever model ``spec`` names (loads that model once)."""
    from hasslefree.loading import load_model

    return load_model(spec)[1]


def _checkpoint_tokenizer(directory: Path, source: str | None) -> Any:
    """The tokenizer saved with the checkpoint, except for llama2.c sources whose sentencepiece
    tokenizer does not round-trip through ``save_pretrained``: that is reloaded from its file.

    ``source`` comes from the checkpoint's own JSON, so it is untrusted: only a built-in alias
    (``smollm2``, ``stories260K``) is ever loaded from it, never a path or hub id it names.
    """
    from hasslefree.loading import builtin_alias, resolve_alias

    alias = builtin_alias(source)
    if alias:
        path = Path(resolve_alias(alias)) if _resolvable(alias) else None
        if path is not None and path.suffix == ".bin" and path.is_file():
            from hasslefree.loading.llama2c import load_llama2c_tokenizer

            return load_llama2c_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        if alias:
            logger.info("no usable tokenizer in %s (%s); loading the one of %s", directory, exc, alias)
            return _tokenizer_from(alias)
        named = f" (its run config names {source!r}, which is not loaded from a checkpoint file)" if source else ""
        raise FileNotFoundError(f"{directory} holds no tokenizer{named}; pass one with --tokenizer") from exc


def _resolvable(source: str) -> bool:
    from hasslefree.loading import resolve_alias

    try:
        resolve_alias(source)
    except FileNotFoundError:
        return False
    return True


def perplexities(model: nn.Module, tokenizer: Any, datasets: Sequence[str], seqlen: int, *,
                 max_windows: int | None = None, device: str | torch.device | None = None) -> list[PerplexityRow]:
    """Protocol perplexity per dataset; ``max_windows`` further limits the windows scored."""
    rows = []
    for name in datasets:
        tokens = eval_tokens(tokenizer, name, seqlen=seqlen)
        limits = [w for w in (eval_max_windows(name), max_windows) if w is not None]
        windows = min([tokens.shape[1] // seqlen, *limits])
        began = time.perf_counter()
        value = perplexity(model, tokens, seqlen, device=device, max_windows=min(limits) if limits else None)
        rows.append(PerplexityRow(str(name), seqlen, windows, value, time.perf_counter() - began))
        logger.info("%s: perplexity %.4f over %d windows of %d tokens", name, value, windows, seqlen)
    return rows


def check_eval_inputs(ppl: str, tasks: str | None, *, max_windows: int | None = None, tasks_path: str | None = None,
                      limit: int | None = None, batch_size: int = 1, tasks_data: str | None = None,
                      json_path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """``hasslefree eval``'s comma-separated datasets and tasks, checked before any model is
    loaded (ValueError, OSError, or ImportError when tasks need a missing lm-eval): unknown
    tasks, a missing zero-shot data folder or task file, a JSON path in no folder."""
    from hasslefree.data import resolve_source

    datasets = [d.strip() for d in ppl.split(",") if d.strip()]
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not datasets and not names:
        raise ValueError("--ppl names no dataset and --tasks no task")
    for name in datasets:
        resolve_source(name)
    if max_windows is not None and max_windows < 1:
        raise ValueError("--max-windows must be >= 1")
    if names:
        from hasslefree.zeroshot import task_manager

        if (limit is not None and limit < 1) or batch_size < 1:
            raise ValueError("--limit and --batch-size must be >= 1")
        task_manager(names, tasks_path, tasks_data)
    elif tasks_path or tasks_data or limit is not None:
        raise ValueError("--tasks-path, --tasks-data and --limit need --tasks")
    if json_path is not None:
        folder = Path(json_path).expanduser().resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--json {json_path}: folder {folder} does not exist")
    return datasets, names


def eval_results(model: nn.Module, tokenizer: Any, datasets: Sequence[str], seqlen: int | None, tasks: Sequence[str],
                 *, max_windows: int | None = None, tasks_path: str | None = None, limit: int | None = None,
                 batch_size: int = 1, tasks_data: str | None = None) -> tuple[list[PerplexityRow], list[Any]]:
    """The perplexity rows, then the zero-shot rows (each empty unless asked for)."""
    ppl_rows: list[PerplexityRow] = []
    if datasets:
        assert seqlen is not None
        ppl_rows = perplexities(model, tokenizer, datasets, seqlen, max_windows=max_windows)
    zs_rows: list[Any] = []
    if tasks:
        from hasslefree.zeroshot import zero_shot_rows

        zs_rows = zero_shot_rows(model, tokenizer, tasks, batch_size=batch_size, limit=limit, include_path=tasks_path,
                                 tasks_data=tasks_data)
    return ppl_rows, zs_rows


def results_json(model: str, ppl_rows: Sequence[PerplexityRow], zs_rows: Sequence[Any], *,
                 limit: int | None = None) -> dict[str, Any]:
    """What ``hasslefree eval --json`` writes: perplexity per dataset, 0-shot accuracy (a
    fraction) per task and their plain average over the tasks that are not groups."""
    out: dict[str, Any] = {"model": model,
                           "perplexity": {r.dataset: {"perplexity": r.perplexity, "seqlen": r.seqlen,
                                                      "windows": r.windows} for r in ppl_rows}}
    if zs_rows:
        leaves = [r.accuracy for r in zs_rows if r.samples]
        out["zeroshot"] = {r.task: {"accuracy": r.accuracy, "metric": r.metric, "samples": r.samples} for r in zs_rows}
        out["zeroshot_average"] = sum(leaves) / len(leaves) if leaves else None
        out["zeroshot_limit"] = limit
    return out


def eval_tables(model: nn.Module, tokenizer: Any, datasets: Sequence[str], seqlen: int | None, tasks: Sequence[str],
                *, max_windows: int | None = None, tasks_path: str | None = None, limit: int | None = None,
                batch_size: int = 1, tasks_data: str | None = None, json_path: str | Path | None = None,
                model_name: str = "") -> str:
    """The perplexity table, then the zero-shot table (each only when asked for); with
    ``json_path``, the same numbers also go to that JSON file (:func:`results_json`)."""
    ppl_rows, zs_rows = eval_results(model, tokenizer, datasets, seqlen, tasks, max_windows=max_windows,
                                     tasks_path=tasks_path, limit=limit, batch_size=batch_size, tasks_data=tasks_data)
    tables = []
    if datasets:
        tables.append(format_table(("dataset", "seqlen", "windows", "perplexity"),
                                   [(r.dataset, r.seqlen, r.windows, r.perplexity) for r in ppl_rows]))
    if tasks:
        from hasslefree.zeroshot import format_rows

        tables.append(format_rows(zs_rows))
    if json_path is not None:
        import json

        results = results_json(model_name, ppl_rows, zs_rows, limit=limit)
        Path(json_path).expanduser().write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return "\n\n".join(tables)
