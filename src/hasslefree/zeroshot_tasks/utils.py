"""Loaders and ``process_docs`` of hasslefree's local zero-shot tasks.

Each function turns the records of one local file (see ``shared/data/zeroshot/README.md``)
into the field layout of the Hugging Face dataset that lm-eval's standard task of the same
name reads, so that task's ``doc_to_text``/``doc_to_choice``/``doc_to_target`` apply
unchanged (the YAMLs beside this file repeat them; the WinoGrande functions and the HellaSwag
preprocessing are lm-eval's own, imported). lm-eval loads this file by path from the YAMLs'
``!function utils.…`` tags; it is also importable as ``hasslefree.zeroshot_tasks.utils``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.tasks.hellaswag.utils import process_docs as _hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

__all__ = [
    "load_piqa", "load_winogrande", "process_arc", "process_boolq", "process_hellaswag",
    "process_openbookqa", "process_rte", "winogrande_doc_to_choice", "winogrande_doc_to_target",
    "winogrande_doc_to_text",
]

BOOLQ_LABELS = {"false": 0, "true": 1}  # SuperGLUE: 1 = the answer is yes
RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # GLUE rte's ClassLabel order
HELLASWAG_LINES = 6  # "activity_label: ctx", gold index, four endings


# ---------------------------------------------------------------- tasks with a separate label file


def read_labels(path: str | Path, allowed: set[str], count: int) -> list[str]:
    """The labels of ``path``, one per line, each in ``allowed``, exactly ``count`` of them."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if len(labels) != count:
        raise ValueError(f"{path}: {len(labels)} labels for {count} records")
    for number, label in enumerate(labels, 1):
        if label not in allowed:
            raise ValueError(f"{path}, line {number}: label {label!r} is not one of {sorted(allowed)}")
    return labels


def _json_split(data_file: str | Path, split: str) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={split: str(data_file)})


def load_piqa(data_file: str, labels_file: str, **task_metadata: Any) -> Any:
    """PIQA's validation split in the hub's layout: goal, sol1, sol2 and ``label`` (0: sol1 is
    right, 1: sol2), the label read from ``labels_file`` line by line. ``task_metadata`` (lm-eval
    passes a task's metadata to its dataset function) is not needed here."""
    dataset = _json_split(data_file, "validation")
    labels = read_labels(labels_file, {"0", "1"}, len(dataset["validation"]))
    dataset["validation"] = dataset["validation"].add_column("label", [int(x) for x in labels])
    return dataset


def load_winogrande(data_file: str, labels_file: str, **task_metadata: Any) -> Any:
    """WinoGrande's dev split in the hub's layout (sentence, option1, option2, ``answer`` "1" or
    "2"), the answer read from ``labels_file``; a record whose own ``answer`` disagrees is an
    error (the two files do not belong together). ``task_metadata`` as in :func:`load_piqa`."""
    dataset = _json_split(data_file, "validation")
    docs = dataset["validation"]
    labels = read_labels(labels_file, {"1", "2"}, len(docs))
    if "answer" in docs.column_names:
        for number, (own, label) in enumerate(zip(docs["answer"], labels), 1):
            if str(own) != label:
                raise ValueError(f"{data_file}, record {number}: answer {own!r} but {labels_file} says {label!r}")
        docs = docs.remove_columns("answer")
    dataset["validation"] = docs.add_column("answer", labels)
    return dataset


# ---------------------------------------------------------------- process_docs of the json/text tasks


def _choice_lists(choices: Any) -> dict[str, list[str]]:
    """``{"text": [...], "label": [...]}`` from AI2's list of {text, label} (however datasets
    decoded it: a list of dicts, or already a dict of lists)."""
    if isinstance(choices, dict):
        return {"text": list(choices["text"]), "label": list(choices["label"])}
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def arc_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """An AI2 ARC record as allenai/ai2_arc has it: question (the stem), choices, answerKey."""
    return {"id": doc["id"], "question": doc["question"]["stem"],
            "choices": _choice_lists(doc["question"]["choices"]), "answerKey": doc["answerKey"]}


def openbookqa_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """An OpenBookQA record as allenai/openbookqa (main) has it: question_stem, choices, answerKey."""
    return {"id": doc["id"], "question_stem": doc["question"]["stem"],
            "choices": _choice_lists(doc["question"]["choices"]), "answerKey": doc["answerKey"]}


def _label(value: Any, encoding: dict[str, int], task: str) -> int:
    key = str(value).strip().lower() if isinstance(value, (str, bool)) else None
    if key not in encoding:
        raise ValueError(f"{task}: label {value!r} is not one of {sorted(encoding)}")
    return encoding[key]


def boolq_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A BoolQ record with the hub's integer label: "false" -> 0 (no), "true" -> 1 (yes)."""
    return {"question": doc["question"], "passage": doc["passage"], "idx": doc["idx"],
            "label": _label(doc["label"], BOOLQ_LABELS, "boolq")}


def rte_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A SuperGLUE RTE record as GLUE rte has it: sentence1, sentence2, label 0 (entailment) or
    1 (not_entailment), idx."""
    return {"sentence1": doc["premise"], "sentence2": doc["hypothesis"],
            "label": _label(doc["label"], RTE_LABELS, "rte"), "idx": doc["idx"]}


def _mapped(dataset: Any, function: Any) -> Any:
    return dataset.map(function, remove_columns=dataset.column_names)


def process_arc(dataset: Any) -> Any:
    return _mapped(dataset, arc_doc)


def process_openbookqa(dataset: Any) -> Any:
    return _mapped(dataset, openbookqa_doc)


def process_boolq(dataset: Any) -> Any:
    return _mapped(dataset, boolq_doc)


def process_rte(dataset: Any) -> Any:
    return _mapped(dataset, rte_doc)


def hellaswag_doc(lines: list[str]) -> dict[str, Any]:
    """One item of the derived 6-line file in the hub's layout, as far as it can be: the first
    line is ``activity_label + ": " + ctx``; the file no longer tells ``ctx_a`` from ``ctx_b``,
    so all of ctx goes to ``ctx_a`` and ``ctx_b`` is empty."""
    if len(lines) != HELLASWAG_LINES:
        raise ValueError(f"hellaswag: an item has {len(lines)} lines, not {HELLASWAG_LINES}")
    head, gold, *endings = lines
    activity, colon, ctx = head.partition(": ")
    if not colon:
        raise ValueError(f"hellaswag: first line of an item lacks 'activity_label: ': {head[:80]!r}")
    if gold.strip() not in ("0", "1", "2", "3"):
        raise ValueError(f"hellaswag: gold index {gold!r} is not 0-3 (after {head[:80]!r})")
    return {"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "endings": endings,
            "label": gold.strip()}


def _hellaswag_batch(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
    doc = hellaswag_doc(batch["text"])
    return {key: [value] for key, value in doc.items()}


def process_hellaswag(dataset: Any) -> Any:
    """The text builder's lines (one row each), six at a time, as hub-layout items, then
    lm-eval's own hellaswag ``process_docs`` (query, choices, gold).

    Differences from lm-eval's hellaswag, which the derived file makes unavoidable: lm-eval's
    query is ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; this file
    holds the raw ``ctx`` (= ctx_a + " " + ctx_b), so ctx_b keeps its lower-case first letter
    (e.g. "... on a roof. he" where lm-eval has "... on a roof. He"), and the rest of ctx_b keeps
    its case too. The file's own tag clean-up (removing [header], [step], [substeps], [title],
    collapsing double spaces) happened before, so spacing and punctuation around former tags may
    differ slightly; lm-eval's ``preprocess`` runs again on top and removes the remaining
    ``[...]`` tags. Items, their order, the endings and the gold labels are lm-eval's.
    """
    if len(dataset) % HELLASWAG_LINES:
        raise ValueError(f"hellaswag: {len(dataset)} lines is not a multiple of {HELLASWAG_LINES}")
    items = dataset.map(_hellaswag_batch, batched=True, batch_size=HELLASWAG_LINES,
                        remove_columns=dataset.column_names)
    return _hellaswag_process_docs(items)
