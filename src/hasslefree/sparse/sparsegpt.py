"""SparseGPT: approximate P1 minimiser with the full Hessian (Frantar & Alistarh, 2023).

Columns are pruned left to right; the error of each pruned column is spread over the
not-yet-visited columns through the upper Cholesky factor of H⁻¹ (optimal brain surgeon
updates), in blocks so that the bulk of the work is one matrix product per block.
"""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.patterns import SparsityPattern, topk_mask


def sparsegpt_prune(
    target: torch.Tensor,
    hessian: PreparedHessian,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    adaptive_mask: bool = True,
    **_: object,
) -> torch.Tensor:
    """Prune ``target`` (out x in) to ``pattern`` with SparseGPT's blocked OBS updates.

    N:M masks are chosen at the start of every group of M columns, from the weights as
    updated so far. Unstructured/row masks are chosen per block (``adaptive_mask``, the
    original behaviour, budget shared across blocks in proportion to their width) or once
    up front (``adaptive_mask=False``), which with H = I is exactly magnitude pruning.
    """
    weight = target.to(hessian.damped.dtype).clone()
    rows, cols = weight.shape
    weight[:, hessian.dead] = 0
    hinv = hessian.inverse_cholesky_upper()
    if pattern.kind == "dense":
        return weight.to(target.dtype)
    if pattern.kind == "nm":
        blocksize = max(pattern.m, (blocksize // pattern.m) * pattern.m)
    keep_all = None
    if pattern.kind != "nm" and not adaptive_mask:
        keep_all = pattern.mask_from_scores(weight.square() / hinv.diagonal().square())

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        if pattern.kind == "nm":
            keep = torch.zeros_like(block, dtype=torch.bool)
        elif keep_all is not None:
            keep = keep_all[:, start:end]
        else:
            keep = _block_mask(block.square() / diag.square(), pattern, start, end, cols)

        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = block[:, i:i + pattern.m]
                scores = group.square() / diag[i:i + pattern.m].square()
                keep[:, i:i + pattern.m] = pattern.mask_from_scores(scores)
            column = block[:, i]
            error = column * (~keep[:, i]) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, start:end] = block * keep
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return weight.to(target.dtype)


def _block_mask(scores: torch.Tensor, pattern: SparsityPattern, start: int, end: int,
                cols: int) -> torch.Tensor:
    """Keep mask for one block of an unstructured/row pattern, budget pro rata to width."""
    rows = scores.shape[0]
    if pattern.kind == "row":
        budget = pattern.row_budget(cols)
        count = round(budget * end / cols) - round(budget * start / cols)
        return topk_mask(scores, count, dim=1)
    total = pattern.kept_count(rows, cols)
    count = round(total * end / cols) - round(total * start / cols)
    return topk_mask(scores.reshape(1, -1), count, dim=1).reshape(scores.shape)

