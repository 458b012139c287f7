"""Zero-shot bridge to lm-evaluation-harness.

A tiny local multiple-choice task (tests/data/zeroshot) scored through lm-eval must give the
accuracies of a plain torch loop over the same model: per example, the choice with the
highest log-likelihood of " " + choice after the question (divided by the choice's length
in characters for acc_norm). The error paths run without lm-eval too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hasslefree import zeroshot
from hasslefree.cli import main

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "zeroshot"
TASK = "hasslefree_tiny_choice"  # acc and acc_norm: acc_norm is reported
TASK_ACC = "hasslefree_tiny_choice_acc"  # the same data with acc only
DOCS = [json.loads(line) for line in (DATA / "tiny_choice.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def lm_eval(monkeypatch, tmp_path):
    """lm-eval, run from the task folder (its YAML's data_files are relative) with the
    datasets cache in a temporary folder."""
    module = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'hasslefree[zeroshot]')")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(DATA)
    return module


@pytest.fixture(scope="module")
def stories():
    loading = pytest.importorskip("hasslefree.loading")
    try:
        return loading.load_model("stories260K")
    except FileNotFoundError as exc:
        pytest.skip(f"stories260K unavailable: {exc}")


def _random_llama(vocab: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def plain_accuracies(model, tokenizer, docs) -> tuple[float, float]:
    """(acc, acc_norm) by direct forward passes: the continuation is what encoding the
    question plus " " + choice adds after the question's own tokens."""
    hits = hits_norm = 0
    for doc in docs:
        context = tokenizer.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["question"] + " " + choice)
            assert whole[:len(context)] == context and len(whole) > len(context)
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == doc["label"]
    return hits / len(docs), hits_norm / len(docs)


@pytest.mark.parametrize("which, batch_size", [("stories260K", 1), ("random", 3)])
def test_matches_plain_loop(lm_eval, stories, which, batch_size):
    model, tokenizer = stories
    if which == "random":
        model = _random_llama(tokenizer.vocab_size)
    acc, acc_norm = plain_accuracies(model, tokenizer, DOCS)
    scores = zeroshot.zero_shot(model, tokenizer, [TASK, TASK_ACC], batch_size=batch_size, include_path=DATA)
    assert scores == pytest.approx({TASK: acc_norm, TASK_ACC: acc, "average": (acc + acc_norm) / 2}, abs=1e-12)


def test_limit_and_rows(lm_eval, stories):
    model, tokenizer = stories
    acc, acc_norm = plain_accuracies(model, tokenizer, DOCS[:3])
    rows = zeroshot.zero_shot_rows(model, tokenizer, [TASK_ACC, TASK], limit=3, include_path=str(DATA))
    assert {(r.task, r.metric, r.samples) for r in rows} == {(TASK, "acc_norm", 3), (TASK_ACC, "acc", 3)}
    assert {r.task: r.accuracy for r in rows} == pytest.approx({TASK: acc_norm, TASK_ACC: acc}, abs=1e-12)


def test_cli_prints_both_tables(lm_eval, stories, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(doc["question"] for doc in DOCS))
    acc, acc_norm = plain_accuracies(*stories, DOCS)
    assert main(["eval", "stories260K", "-q", "--ppl", str(text), "--seqlen", "32", "--tasks", f"{TASK},{TASK_ACC}",
                 "--tasks-path", str(DATA), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and str(text) in out
    table = {cells[0]: cells for cells in map(str.split, out.splitlines())
             if cells and cells[0] in (TASK, TASK_ACC, "average")}
    assert table[TASK][1:] == ["acc_norm", "8", f"{100 * acc_norm:.2f}"]
    assert table[TASK_ACC][1:] == ["acc", "8", f"{100 * acc:.2f}"]
    assert table["average"][1:] == [f"{50 * (acc + acc_norm):.2f}"]


class Untouchable:
    """A stand-in model: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the tasks were checked")


def test_unknown_task_named_before_any_work(lm_eval):
    with pytest.raises(ValueError, match=r"unknown lm-eval task: 'hellaswagg' \(close: hellaswag"):
        zeroshot.zero_shot(Untouchable(), None, ["piqa", "hellaswagg"])
    with pytest.raises(ValueError, match="hasslefree_tiny_choise.*close: hasslefree_tiny_choice"):
        zeroshot.zero_shot(Untouchable(), None, ["hasslefree_tiny_choise"], include_path=DATA)
    with pytest.raises(FileNotFoundError, match="task path"):
        zeroshot.zero_shot(Untouchable(), None, [TASK], include_path=DATA / "missing")


def test_cli_unknown_task_before_loading(lm_eval, tmp_path, capsys):
    # the model does not exist: the task error comes first, so nothing was loaded
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "piqa,arc_eazy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hasslefree: error: unknown lm-eval task: 'arc_eazy' (close: arc_easy")


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"pip install 'hasslefree\[zeroshot\]'"):
        zeroshot.zero_shot(Untouchable(), None, ["piqa"])
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "hasslefree: error: zero-shot evaluation needs lm-evaluation-harness: " \
                  "pip install 'hasslefree[zeroshot]'"


def test_nothing_else_imports_lm_eval():
    code = ("import sys, hasslefree, hasslefree.cli, hasslefree.evaluate, hasslefree.zeroshot, "
            "hasslefree.pipeline, hasslefree.checkpoint; hasslefree.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
