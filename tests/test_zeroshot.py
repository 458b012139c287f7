"""Zero-shot bridge to lm-evaluation-harness.

A tiny local multiple-choice task (tests/data/zeroshot) scored through lm-eval must give the
accuracies of a plain torch loop over the same model: per example, the choice with the
highest log-likelihood of " " + choice after the question (divided by the choice's length
in characters for acc_norm). The error paths run without lm-eval too.

The paper's eight tasks on the local files of shared/data/zeroshot (hasslefree/zeroshot_tasks)
must build, for the first records, the very requests (prompt, continuations), choices and gold
that lm-eval's own standard task builds from the same records in the hub's field layout. Those
tests need the data folder: they skip without it, and fail when $CI is set.
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
from helpers import has_module, unavailable

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "zeroshot"
TASK = "hasslefree_tiny_choice"  # acc and acc_norm: acc_norm is reported
TASK_ACC = "hasslefree_tiny_choice_acc"  # the same data with acc only
DOCS = [json.loads(line) for line in (DATA / "tiny_choice.jsonl").read_text().splitlines() if line.strip()]


def lm_eval_and_datasets():
    """lm-eval and datasets (the ``zeroshot`` extra), or a skip/failure naming the extra."""
    if not (has_module("lm_eval") and has_module("datasets")):
        unavailable("lm-eval not installed (pip install 'hasslefree[zeroshot]')")
    import datasets
    import lm_eval

    return lm_eval, datasets


@pytest.fixture
def lm_eval(monkeypatch, tmp_path):
    """lm-eval, run from the task folder (its YAML's data_files are relative) with the
    datasets cache in a temporary folder."""
    module, datasets = lm_eval_and_datasets()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(DATA)
    return module


@pytest.fixture(scope="module")
def stories():
    from hasslefree.loading import load_model

    try:
        return load_model("stories260K")
    except FileNotFoundError as exc:
        unavailable(f"stories260K unavailable: {exc}")


def _random_llama(vocab: int) -> torch.nn.Module:
    import transformers

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


# ---------------------------------------------------------------- the paper's tasks on local files

ZS_DATA = zeroshot.tasks_data_dir()  # shared/data/zeroshot, or None
ZS_COUNTS = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
             "rte": 277, "openbookqa": 500, "boolq": 3270}  # items per split, from the data README
FIRST = 3  # records compared per task


def _zeroshot_data() -> Path:
    """The zero-shot data folder (see :func:`helpers.unavailable` for what happens without it)."""
    if ZS_DATA is None:
        unavailable("zero-shot data folder not found: expected shared/data/zeroshot beside the repository "
                    "(or $HASSLEFREE_DATA/zeroshot)")
    return ZS_DATA


def _jsonl(path: Path, n: int = FIRST) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _lines(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def _ai2_choices(record: dict) -> dict:
    return {"text": [c["text"] for c in record["question"]["choices"]],
            "label": [c["label"] for c in record["question"]["choices"]]}


def hub_records(task: str, data: Path) -> list[dict]:
    """The first records of the local file, written here (independently of zeroshot_tasks/utils)
    in the field layout of the Hugging Face dataset lm-eval's standard task reads."""
    if task == "piqa":
        labels = _lines(data / "piqa/valid-labels.lst", FIRST)
        return [{**r, "label": int(y)} for r, y in zip(_jsonl(data / "piqa/valid.jsonl"), labels)]
    if task in ("arc_easy", "arc_challenge"):
        name = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}
        return [{"id": r["id"], "question": r["question"]["stem"], "choices": _ai2_choices(r),
                 "answerKey": r["answerKey"]} for r in _jsonl(data / name[task])]
    if task == "openbookqa":
        return [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _ai2_choices(r),
                 "answerKey": r["answerKey"]} for r in _jsonl(data / "openbookqa/test.jsonl")]
    if task == "winogrande":
        labels = _lines(data / "winogrande/dev-labels.lst", FIRST)
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
                for r, y in zip(_jsonl(data / "winogrande/dev.jsonl"), labels)]
    if task == "rte":  # GLUE rte: 0 = entailment, 1 = not_entailment
        return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "idx": r["idx"],
                 "label": {"entailment": 0, "not_entailment": 1}[r["label"]]} for r in _jsonl(data / "rte/val.jsonl")]
    if task == "boolq":  # super_glue boolq: 0 = False, 1 = True
        return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                 "label": {"false": 0, "true": 1}[r["label"]]} for r in _jsonl(data / "boolq/val.jsonl")]
    if task == "hellaswag":  # the whole raw ctx as ctx_a (the file no longer tells ctx_a from ctx_b)
        lines = _lines(data / "hellaswag/hellaswag_val_full.txt", 6 * FIRST)
        records = []
        for i in range(FIRST):
            head, gold, *endings = lines[6 * i:6 * i + 6]
            activity, _, ctx = head.partition(": ")
            records.append({"ind": i, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                            "endings": endings, "source_id": "", "split": "val", "split_type": "indomain",
                            "label": gold})
        return records
    raise KeyError(task)


@pytest.fixture(scope="module")
def zs_cache(tmp_path_factory):
    """lm-eval and datasets, with one datasets cache for the module (each local file is built once)."""
    _, datasets = lm_eval_and_datasets()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets"))
        yield datasets


@pytest.fixture(scope="module")
def local_tasks(zs_cache):
    """The eight local tasks, built by lm-eval from hasslefree's definitions on the local files."""
    data = _zeroshot_data()
    manager = zeroshot.task_manager(list(zeroshot.PAPER_TASKS))
    folder = zeroshot.local_task_folder(data)
    for name in zeroshot.PAPER_TASKS:  # the local definitions take precedence over lm-eval's own
        assert Path(manager.task_index[name].yaml_path).parent == folder
    return manager.load(list(zeroshot.PAPER_TASKS))["tasks"]


def standard_task(task: str, records: list[dict], datasets):
    """lm-eval's own standard task ``task`` (its installed YAML and utils), its dataset replaced by
    ``records`` in every split it declares instead of being downloaded."""
    from lm_eval.api.task import ConfigurableTask

    def download(self, dataset_kwargs=None, **kwargs):
        splits = {self.config.training_split, self.config.validation_split, self.config.test_split} - {None}
        self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(records) for s in splits})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConfigurableTask, "download", download)
        built = zeroshot._manager(()).load([task])["tasks"][task]  # lm-eval's tasks only
    assert "lm_eval" in Path(built.config.metadata["config_source"]).parts
    return built


def _requests(task, n: int = FIRST) -> list[tuple]:
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=n)
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


def _docs(task, n: int = FIRST) -> list[dict]:
    return [task.task_docs[i] for i in range(n)]


@pytest.mark.parametrize("name", zeroshot.PAPER_TASKS)
def test_local_task_builds_what_lm_eval_builds(local_tasks, zs_cache, name):
    data = _zeroshot_data()
    ours = local_tasks[name]
    theirs = standard_task(name, hub_records(name, data), zs_cache)
    assert ours.OUTPUT_TYPE == theirs.OUTPUT_TYPE == "multiple_choice"
    assert sorted(ours._metric_fn_list) == sorted(theirs._metric_fn_list)
    assert ours.config.target_delimiter == theirs.config.target_delimiter
    for mine, standard in zip(_docs(ours), _docs(theirs), strict=True):
        assert ours.doc_to_text(mine) == theirs.doc_to_text(standard)
        assert ours.doc_to_choice(mine) == theirs.doc_to_choice(standard)
        assert ours.doc_to_target(mine) == theirs.doc_to_target(standard)
    # what the model is asked: (context, continuation) per choice, prompts included
    requests = _requests(ours)
    assert requests == _requests(theirs)
    assert len(requests) == sum(len(ours.doc_to_choice(d)) for d in _docs(ours))
    assert len(ours.task_docs) == ZS_COUNTS[name]


def test_local_labels_over_whole_files(local_tasks):
    """The label encodings over every record (counts from the data README)."""
    from collections import Counter

    boolq = local_tasks["boolq"]
    assert Counter(boolq.task_docs["label"]) == {1: 2033, 0: 1237}  # "true" is yes = choice 1
    assert [boolq.doc_to_choice(d) for d in _docs(boolq, 1)] == [["no", "yes"]]
    rte = local_tasks["rte"]
    assert Counter(rte.task_docs["label"]) == {0: 146, 1: 131}  # "entailment" is "True" = choice 0
    assert Counter(local_tasks["hellaswag"].task_docs["label"]) == {"0": 2515, "1": 2485, "2": 2584, "3": 2458}
    data = _zeroshot_data()
    piqa = local_tasks["piqa"]
    labels = (data / "piqa/valid-labels.lst").read_text().split()
    assert piqa.task_docs["label"] == [int(x) for x in labels]
    wino = local_tasks["winogrande"]
    assert wino.task_docs["answer"] == (data / "winogrande/dev-labels.lst").read_text().split()
    # partial evaluation: the gold option's index as the "text", the two contexts as choices
    doc = _docs(wino, 1)[0]
    assert wino.doc_to_text(doc) == int(doc["answer"]) - 1
    assert wino.doc_to_choice(doc) == [doc["sentence"][:doc["sentence"].index("_")] + o
                                       for o in (doc["option1"], doc["option2"])]


def test_hellaswag_caveat(local_tasks):
    """lm-eval's preprocess runs on the derived file's raw ctx: [..] tags go, but ctx_b keeps
    its lower-case first letter (lm-eval has "... on a roof. He")."""
    doc = _docs(local_tasks["hellaswag"], 1)[0]
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert not any("[" in d for d in local_tasks["hellaswag"].task_docs["query"][:2000])


# ---------------------------------------------------------------- label encodings (no shared data needed)


@pytest.fixture
def task_utils(lm_eval):
    from hasslefree.zeroshot_tasks import utils

    return utils


def test_boolq_and_rte_label_strings(task_utils):
    record = {"question": "q", "passage": "p", "idx": 0}
    assert task_utils.boolq_doc({**record, "label": "true"})["label"] == 1
    assert task_utils.boolq_doc({**record, "label": "false"})["label"] == 0
    with pytest.raises(ValueError, match="boolq: label 'maybe'"):
        task_utils.boolq_doc({**record, "label": "maybe"})
    pair = {"premise": "a", "hypothesis": "b", "idx": 3}
    assert task_utils.rte_doc({**pair, "label": "entailment"}) == {"sentence1": "a", "sentence2": "b", "label": 0,
                                                                    "idx": 3}
    assert task_utils.rte_doc({**pair, "label": "not_entailment"})["label"] == 1
    with pytest.raises(ValueError, match="rte: label 'neutral'"):
        task_utils.rte_doc({**pair, "label": "neutral"})


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_piqa_and_winogrande_label_files(task_utils, tmp_path):
    piqa = _write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g1", "sol1": "a", "sol2": "b"},
                                                  {"goal": "g2", "sol1": "c", "sol2": "d"}])
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    docs = task_utils.load_piqa(piqa, str(tmp_path / "valid-labels.lst"), version=1.0)["validation"]
    assert docs["label"] == [1, 0] and docs["goal"] == ["g1", "g2"]
    (tmp_path / "short.lst").write_text("1\n")
    with pytest.raises(ValueError, match=r"short\.lst: 1 labels for 2 records"):
        task_utils.load_piqa(piqa, str(tmp_path / "short.lst"))
    (tmp_path / "bad.lst").write_text("1\n2\n")
    with pytest.raises(ValueError, match=r"bad\.lst, line 2: label '2'"):
        task_utils.load_piqa(piqa, str(tmp_path / "bad.lst"))

    wino = _write_jsonl(tmp_path / "dev.jsonl", [{"qID": "x", "sentence": "A _ b.", "option1": "o", "option2": "p",
                                                 "answer": "2"}])
    (tmp_path / "dev-labels.lst").write_text("2\n")
    docs = task_utils.load_winogrande(wino, str(tmp_path / "dev-labels.lst"))["validation"]
    assert docs["answer"] == ["2"]
    (tmp_path / "other.lst").write_text("1\n")
    with pytest.raises(ValueError, match=r"record 1: answer '2' but .*other\.lst says '1'"):
        task_utils.load_winogrande(wino, str(tmp_path / "other.lst"))


def test_hellaswag_items(task_utils):
    lines = ["Label: Ctx [title] more. he", "2", "e0", "e1", "e2", "e3"]
    doc = task_utils.hellaswag_doc(lines)
    assert doc["activity_label"] == "Label" and doc["ctx_a"] == "Ctx [title] more. he" and doc["ctx_b"] == ""
    assert doc["endings"] == ["e0", "e1", "e2", "e3"] and doc["label"] == "2"
    with pytest.raises(ValueError, match="gold index 'x'"):
        task_utils.hellaswag_doc([*lines[:1], "x", *lines[2:]])


# ---------------------------------------------------------------- missing data: clear errors before any work


@pytest.fixture
def default_manager(lm_eval, monkeypatch):
    """Any set of include paths gets lm-eval's own manager (indexing costs seconds each)."""
    manager = zeroshot._manager(())
    monkeypatch.setattr(zeroshot, "_manager", lambda paths: manager)
    return manager


def test_missing_data_folder_names_folder_and_task(default_manager, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"zero-shot data folder .*nowhere does not exist "
                                                r"\(needed by tasks 'piqa', 'boolq'\)"):
        zeroshot.zero_shot(Untouchable(), None, ["piqa", "boolq"], tasks_data=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as caught:
        zeroshot.zero_shot(Untouchable(), None, ["piqa"], tasks_data=tmp_path)
    assert str(caught.value) == (f"task 'piqa': piqa/valid.jsonl, piqa/valid-labels.lst missing from the "
                                 f"zero-shot data folder {tmp_path.resolve()}")
    (tmp_path / "zeroshot" / "rte").mkdir(parents=True)  # a data root holding zeroshot/, with rte's folder empty
    with pytest.raises(FileNotFoundError, match=r"task 'rte': rte/val\.jsonl missing from the zero-shot data folder "
                                                f".*{tmp_path.name}/zeroshot$"):
        zeroshot.task_manager(["rte"], tasks_data=tmp_path)
    shared = tmp_path / "data"  # a shared data folder without zeroshot/
    shared.mkdir()
    monkeypatch.setenv("HASSLEFREE_DATA", str(shared))
    with pytest.raises(FileNotFoundError) as caught:
        zeroshot.task_manager(["winogrande"])
    message = str(caught.value)
    assert message.startswith(f"no zero-shot data folder for task 'winogrande': looked for {shared / 'zeroshot'}")
    assert "--tasks-data" in message and "\n" not in message


def test_cli_missing_data_before_loading(default_manager, tmp_path, capsys):
    # the model does not exist: the data error comes first, so nothing was loaded
    assert main(["eval", str(tmp_path / "no-model"), "--ppl", "", "--tasks", "arc_easy,piqa",
                 "--tasks-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"hasslefree: error: task 'arc_easy': arc_easy/ARC-Easy-Test.jsonl missing from the zero-shot "
                   f"data folder {tmp_path.resolve()}")
    assert main(["eval", str(tmp_path / "no-model"), "--tasks-data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("--tasks-path, --tasks-data and --limit need --tasks")


# ---------------------------------------------------------------- end to end, --limit 3


def test_tiny_llama_on_two_local_tasks(local_tasks, stories):
    from helpers import tiny_llama

    tokenizer = stories[1]
    model = tiny_llama(vocab_size=tokenizer.vocab_size)
    rows = zeroshot.zero_shot_rows(model, tokenizer, ["arc_easy", "winogrande"], limit=3, batch_size=2)
    assert {(r.task, r.metric, r.samples) for r in rows} == {("arc_easy", "acc_norm", 3), ("winogrande", "acc", 3)}
    assert all(0 <= r.accuracy <= 1 for r in rows)
    scores = zeroshot.zero_shot(model, tokenizer, ["arc_easy", "winogrande"], limit=3, batch_size=2)
    assert scores == pytest.approx({**{r.task: r.accuracy for r in rows},
                                    "average": sum(r.accuracy for r in rows) / 2}, abs=1e-12)


def test_cli_two_local_tasks_to_json(local_tasks, stories, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "stories260K", "-q", "--ppl", "", "--tasks", "piqa,boolq", "--limit", "3", "--batch-size",
                 "2", "--tasks-data", str(_zeroshot_data().parent), "--json", str(out)]) == 0
    printed = {cells[0]: cells for cells in map(str.split, capsys.readouterr().out.splitlines())
               if cells and cells[0] in ("piqa", "boolq", "average")}
    results = json.loads(out.read_text())
    assert results["model"] == "stories260K" and results["perplexity"] == {} and results["zeroshot_limit"] == 3
    tasks = results["zeroshot"]
    assert {name: (t["metric"], t["samples"]) for name, t in tasks.items()} == {"piqa": ("acc_norm", 3),
                                                                                "boolq": ("acc", 3)}
    assert all(0 <= t["accuracy"] <= 1 for t in tasks.values())
    assert results["zeroshot_average"] == pytest.approx((tasks["piqa"]["accuracy"] + tasks["boolq"]["accuracy"]) / 2)
    for name, t in tasks.items():
        assert printed[name][1:] == [t["metric"], "3", f"{100 * t['accuracy']:.2f}"]
    assert printed["average"][1:] == [f"{100 * results['zeroshot_average']:.2f}"]
