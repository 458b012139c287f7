"""Reading datasets: evaluation text and the documents calibration samples from
(``hasslefree.calibration``), following the SparseGPT/OATS protocol.

Named datasets (``wikitext2``, ``ptb``, ``c4``) are read from the shared data folder
(``../shared/data/text`` beside the repository, or ``$HASSLEFREE_DATA/text``), falling back
to the ``datasets`` library when it is installed. Any ``.txt``/``.raw``,
``.jsonl``/``.json`` (field ``text``) or ``.parquet`` (column ``text``) file works too.

Evaluation text:
  - wikitext2: test rows joined with "\\n\\n" (the GPTQ/SparseGPT string, 1,294,336 chars);
  - ptb: test sentences (stripped lines) joined with " ";
  - c4: the first 1100 validation documents joined with " ", truncated to 256 windows;
  - a file: plain text as-is, documents (jsonl/json/parquet) joined with " ".
Calibration reads C4 documents 1100-1999 only, so that calibration and C4 evaluation never
overlap. All text is tokenised without BOS/EOS.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .loading.paths import find_data_dir

logger = logging.getLogger(__name__)

C4_EVAL_DOCS = range(0, 1100)
C4_CALIB_DOCS = range(1100, 2000)
C4_EVAL_WINDOWS = 256

TEXT_SUFFIXES = (".txt", ".raw")
DOC_SUFFIXES = (".jsonl", ".json", ".parquet")

_ALIASES = {
    "wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2", "wiki": "wikitext2",
    "ptb": "ptb", "penn-treebank": "ptb",
    "c4": "c4",
}
_FILES = {  # (evaluation file, calibration file) inside <data dir>/text
    "wikitext2": ("wikitext2.test.raw", "wikitext2.valid.raw"),
    "ptb": ("ptb.test.txt", "ptb.valid.txt"),
    "c4": ("c4.validation-2k.parquet", "c4.validation-2k.parquet"),
}
DATASETS = tuple(_FILES)


@dataclass(frozen=True)
class Source:
    """What a user-supplied dataset name or path refers to."""

    name: str | None  # canonical dataset name, or None for a user file
    path: Path | None  # local file, or None when only the `datasets` library can provide it


# ---------------------------------------------------------------- resolving names and paths


def resolve_source(name_or_path: str | Path, *, split: str = "eval", data_root: str | Path | None = None) -> Source:
    """Resolve a dataset name or file path, failing with a clear message before any work."""
    key = str(name_or_path)
    canonical = _ALIASES.get(key.lower()) if isinstance(name_or_path, str) else None
    if canonical is not None:
        return Source(canonical, _local_dataset_file(canonical, split, data_root))
    path = Path(key).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in TEXT_SUFFIXES + DOC_SUFFIXES:
            raise ValueError(
                f"unsupported data file {path}: use .txt/.raw, .jsonl/.json (field 'text') or "
                ".parquet (column 'text')"
            )
        if path.stat().st_size == 0:
            raise ValueError(f"data file {path} is empty")
        return Source(None, path)
    if path.exists():
        raise ValueError(f"{path} is not a file")
    if suffix in TEXT_SUFFIXES + DOC_SUFFIXES or "/" in key or "\\" in key:
        raise FileNotFoundError(f"data file {path} does not exist")
    raise ValueError(
        f"unknown dataset {key!r}: use one of {', '.join(DATASETS)} or a path to a "
        ".txt/.raw, .jsonl/.json or .parquet file"
    )


def _local_dataset_file(name: str, split: str, data_root: str | Path | None) -> Path | None:
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    root = Path(data_root).expanduser() if data_root is not None else find_data_dir(required=False)
    if root is None:
        return None
    folder = root / "text" if (root / "text").is_dir() else root
    path = folder / _FILES[name][0 if split == "eval" else 1]
    if path.is_file():
        return path
    if data_root is not None:
        raise FileNotFoundError(f"{name}: expected {path} under the given data root")
    return None


# ---------------------------------------------------------------- reading raw documents


def read_documents(path: Path) -> list[str]:
    """Documents of a ``.jsonl``/``.json`` (field ``text``) or ``.parquet`` (column ``text``)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path} has no 'text' column (columns: {table.column_names})")
        docs = [d for d in table.column("text").to_pylist() if d is not None]
    elif suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    docs.append(_text_field(json.loads(line), f"{path}:{n}"))
    elif suffix == ".json":
        obj = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(obj, dict) and isinstance(obj.get("text"), list):
            docs = [str(d) for d in obj["text"]]
        elif isinstance(obj, list):
            docs = [_text_field(item, f"{path}[{i}]") for i, item in enumerate(obj)]
        else:
            docs = [_text_field(obj, str(path))]
    else:
        raise ValueError(f"{path} is not a document file ({', '.join(DOC_SUFFIXES)})")
    if not any(d.strip() for d in docs):
        raise ValueError(f"{path} contains no text")
    return docs


def _text_field(item: Any, where: str) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise ValueError(f"{where}: expected an object with a string field 'text'")
    return item["text"]


def wikitext2_join(raw: str) -> str:
    """Rows of a raw WikiText-2 file joined the GPTQ/SparseGPT way (HF rows, "\\n\\n")."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def ptb_join(raw: str) -> str:
    """PTB sentences (stripped lines, as the HF dataset yields them) joined with " "."""
    lines = raw.split("\n")
    if raw.endswith("\n"):
        lines.pop()
    return " ".join(line.strip() for line in lines)


def _named_documents(source: Source, split: str) -> list[str]:
    """Documents of a named dataset, with its split and document range applied."""
    docs_range = C4_EVAL_DOCS if split == "eval" else C4_CALIB_DOCS
    if source.path is not None:
        if source.name == "c4":
            docs = read_documents(source.path)
            if len(docs) < docs_range.stop:
                raise ValueError(f"{source.path} has {len(docs)} documents, need {docs_range.stop}")
            return docs[docs_range.start : docs_range.stop]
        raw = source.path.read_text(encoding="utf-8")
        return [wikitext2_join(raw) if source.name == "wikitext2" else ptb_join(raw)]
    return _hub_documents(source.name, split, docs_range)


def _hub_documents(name: str, split: str, docs_range: range) -> list[str]:
    """Fetch a named dataset with the ``datasets`` library when no local copy exists."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise FileNotFoundError(
            f"dataset {name!r} not found locally (no shared/data/text folder; set $HASSLEFREE_DATA "
            "or pass a file path) and the `datasets` library is not installed"
        ) from None
    logger.info("%s not found locally; loading it with the datasets library", name)
    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "eval" else "train")["text"]
        return ["\n\n".join(rows)]
    if name == "ptb":
        rows = load_dataset("ptb_text_only", "penn_treebank", split="test" if split == "eval" else "train")["sentence"]
        return [" ".join(rows)]
    ds = load_dataset(
        "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
    )
    return list(ds.select(docs_range)["text"])


def documents(name_or_path: str | Path, *, split: str = "eval", data_root: str | Path | None = None) -> list[str]:
    """The documents of a dataset or file: one string for plain text, several for C4/jsonl."""
    source = resolve_source(name_or_path, split=split, data_root=data_root)
    if source.name is not None:
        return _named_documents(source, split)
    assert source.path is not None
    if source.path.suffix.lower() in TEXT_SUFFIXES:
        text = source.path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"data file {source.path} contains only whitespace")
        return [text]
    return read_documents(source.path)


def eval_text(name_or_path: str | Path, *, data_root: str | Path | None = None) -> str:
    """The evaluation string of a dataset or file (documents joined with " ")."""
    return " ".join(documents(name_or_path, split="eval", data_root=data_root))


# ---------------------------------------------------------------- tokenising


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (works for HF and plain tokenizers)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def eval_max_windows(name_or_path: str | Path) -> int | None:
    """Windows the protocol evaluates for a dataset (C4: 256), None for all."""
    return C4_EVAL_WINDOWS if _ALIASES.get(str(name_or_path).lower()) == "c4" else None


def eval_tokens(
    tokenizer: Any,
    name_or_path: str | Path,
    *,
    seqlen: int | None = None,
    data_root: str | Path | None = None,
) -> torch.LongTensor:
    """Token ids ``[1, T]`` of the evaluation text (C4 cut to 256 windows when ``seqlen`` is given)."""
    ids = torch.tensor([encode(tokenizer, eval_text(name_or_path, data_root=data_root))], dtype=torch.long)
    limit = eval_max_windows(name_or_path)
    if limit is not None and seqlen is not None:
        ids = ids[:, : limit * seqlen]
    return ids
