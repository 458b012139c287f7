"""Evaluation text and calibration windows: exact protocol strings, seeds, provenance, errors."""

from __future__ import annotations

import json

import pytest
import torch

import hasslefree.calibration as calibration
import hasslefree.data as data
from hasslefree.calibration import calibration_batch
from hasslefree.data import documents, eval_max_windows, eval_text, eval_tokens
from hasslefree.loading import find_data_dir
from helpers import needs

DATA = find_data_dir(required=False)
pytestmark = needs(DATA is not None, "shared/data folder not found")


@pytest.fixture(scope="module")
def tok():
    from hasslefree.loading.llama2c import load_llama2c_tokenizer

    return load_llama2c_tokenizer(DATA / "models/stories260K/stories260K.bin")


def _c4_docs() -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(DATA / "text/c4.validation-2k.parquet").column("text").to_pylist()


# ------------------------------------------------------------ evaluation text


def test_wikitext2_exact_string():
    text = eval_text("wikitext2")
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n")
    assert eval_text("WikiText-2") == text


def test_ptb_sentences_joined_with_spaces():
    text = eval_text("ptb")
    lines = (DATA / "text/ptb.test.txt").read_text().splitlines()
    assert "\n" not in text
    assert text.startswith("no it was n't black monday but while the new york")
    assert text == " ".join(line.strip() for line in lines)


def test_c4_eval_uses_first_1100_documents(tok):
    docs = _c4_docs()
    assert eval_text("c4") == " ".join(docs[:1100])
    assert eval_max_windows("c4") == 256 and eval_max_windows("wikitext2") is None
    ids = eval_tokens(tok, "c4", seqlen=64)
    assert ids.shape == (1, 256 * 64) and ids.dtype == torch.long


def test_eval_tokens_have_no_bos(tok):
    ids = eval_tokens(tok, DATA / "text/tinystories.validation-head.txt")
    assert ids.shape[0] == 1 and ids[0, 0].item() != tok.bos_token_id
    assert (ids != tok.bos_token_id).all()


def test_document_files(tmp_path):
    rows = [{"text": "first doc"}, {"text": "second doc", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert documents(tmp_path / name) == ["first doc", "second doc"]
        assert eval_text(str(tmp_path / name)) == "first doc second doc"
    (tmp_path / "t.raw").write_text("line one\nline two\n")
    assert eval_text(tmp_path / "t.raw") == "line one\nline two\n"


# ------------------------------------------------------------ calibration


def test_calibration_shape_and_seeds(tok):
    a = calibration_batch(tok, "c4", 8, 128, seed=0)
    b = calibration_batch(tok, "c4", 8, 128, seed=0)
    c = calibration_batch(tok, "c4", 8, 128, seed=1)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_comes_from_c4_documents_1100_onwards(tok):
    docs = _c4_docs()
    assert documents("c4", split="calib") == docs[1100:2000]
    calib = {",".join(map(str, tok.encode(d))) for d in docs[1100:2000]}
    batch = calibration_batch(tok, "c4", 16, 128, seed=3)
    for row in batch.tolist():
        window = ",".join(map(str, row))
        assert any(window in doc for doc in calib)


def test_sample_document_windows_matches_sparsegpt_rules():
    import random

    lengths = [10, 300, 129, 128, 50]
    spans = calibration.sample_document_windows(len(lengths), lengths.__getitem__, 200, 128, random.Random(0))
    assert {d for d, _ in spans} == {1, 2}  # only documents with more than seqlen tokens
    assert all(0 <= s <= lengths[d] - 128 - 1 for d, s in spans)


def test_calibration_falls_back_to_joined_short_documents(tok, tmp_path):
    path = tmp_path / "short_docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Tom saw dog number {i}."}) + "\n" for i in range(20)))
    joined = ",".join(map(str, tok.encode(" ".join(documents(path)))))
    batch = calibration_batch(tok, path, 3, 20, seed=0)
    assert all(",".join(map(str, row)) in joined for row in batch.tolist())
    with pytest.raises(ValueError, match="needs at least 1000"):
        calibration_batch(tok, path, 3, 1000)


def test_calibration_from_text_file(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text((DATA / "text/tinystories.validation-head.txt").read_text()[:20_000])
    tokens = ",".join(map(str, tok.encode(path.read_text())))
    batch = calibration_batch(tok, str(path), 5, 64, seed=0)
    assert batch.shape == (5, 64)
    assert all(",".join(map(str, row)) in tokens for row in batch.tolist())
    assert torch.equal(batch, calibration_batch(tok, path, 5, 64, seed=0))


# ------------------------------------------------------------ bad input


def test_bad_inputs(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        eval_text(empty)
    with pytest.raises(ValueError, match="is empty"):
        calibration_batch(tok, empty, 4, 16)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    with pytest.raises(ValueError, match="only whitespace"):
        eval_text(blank)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time")
    n = len(tok.encode("Once upon a time"))
    with pytest.raises(ValueError, match=rf"has {n} tokens; one window of seqlen=64 needs at least 64"):
        calibration_batch(tok, short, 4, 64)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="nsamples must be a positive integer"):
            calibration_batch(tok, short, bad, 2)
    with pytest.raises(ValueError, match="unknown dataset 'wikitext3'"):
        eval_text("wikitext3")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        eval_text(tmp_path / "missing.txt")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        eval_text(tmp_path / "table.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="field 'text'"):
        eval_text(tmp_path / "bad.jsonl")


def test_missing_named_dataset_without_datasets_library(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "find_data_dir", lambda required=True: None)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(FileNotFoundError, match="datasets` library is not installed"):
        eval_text("ptb")
    with pytest.raises(FileNotFoundError, match="under the given data root"):
        eval_text("ptb", data_root=tmp_path)
