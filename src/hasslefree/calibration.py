"""Calibration windows, sampled as SparseGPT/OATS do: from C4 only documents 1100-1999 (those
never used for C4 evaluation), seeded, tokenised without BOS/EOS."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import torch

from .data import documents, encode

logger = logging.getLogger(__name__)


def calibration_batch(
    tokenizer: Any,
    source: str | Path,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    data_root: str | Path | None = None,
) -> torch.LongTensor:
    """``[nsamples, seqlen]`` random windows for calibration, reproducible from ``seed``.

    Document collections (C4 documents 1100-1999, jsonl/json/parquet files) are sampled
    SparseGPT-style: pick a random document longer than ``seqlen`` tokens, then a random
    window inside it. Plain text (and collections with no long enough document) gives
    random windows of the whole tokenised text.
    """
    if not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples must be a positive integer, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")
    docs = documents(source, split="calib", data_root=data_root)
    rng = random.Random(seed)
    if len(docs) > 1:
        cache: dict[int, list[int]] = {}

        def tokens_of(doc: int) -> list[int]:
            if doc not in cache:
                cache[doc] = encode(tokenizer, docs[doc])
            return cache[doc]

        try:
            spans = sample_document_windows(len(docs), lambda d: len(tokens_of(d)), nsamples, seqlen, rng)
            return torch.tensor([tokens_of(d)[s : s + seqlen] for d, s in spans], dtype=torch.long)
        except _NoLongDocument:
            logger.info("no document of %s has more than %d tokens: sampling the joined text", source, seqlen)
            rng = random.Random(seed)
            docs = [" ".join(docs)]
    tokens = encode(tokenizer, docs[0])
    if len(tokens) < seqlen:
        raise ValueError(
            f"calibration text {source} has {len(tokens)} tokens; one window of seqlen={seqlen} "
            f"needs at least {seqlen}"
        )
    starts = [rng.randint(0, len(tokens) - seqlen) for _ in range(nsamples)]
    return torch.tensor([tokens[s : s + seqlen] for s in starts], dtype=torch.long)


class _NoLongDocument(ValueError):
    """No document is longer than the calibration window."""


def sample_document_windows(
    n_docs: int, length: Callable[[int], int], nsamples: int, seqlen: int, rng: random.Random
) -> list[tuple[int, int]]:
    """``(document, start)`` pairs drawn as SparseGPT does: redraw documents of <= seqlen tokens.

    ``length(doc)`` is only called for drawn documents, so only those get tokenised.
    """
    lengths: dict[int, int] = {}
    spans = []
    for _ in range(nsamples):
        while True:
            doc = rng.randint(0, n_docs - 1)
            if doc not in lengths:
                lengths[doc] = length(doc)
            if lengths[doc] > seqlen:
                break
            if len(lengths) == n_docs and max(lengths.values()) <= seqlen:
                raise _NoLongDocument(
                    f"no document has more than seqlen={seqlen} tokens (longest: {max(lengths.values())})"
                )
        spans.append((doc, rng.randint(0, lengths[doc] - seqlen - 1)))
    return spans
