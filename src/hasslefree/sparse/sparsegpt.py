"""SparseGPT: approximate P1 minimiser with the full Hessian (Frantar & Alistarh, 2023).

Columns are pruned left to right; the error of each pruned column is spread over the
not-yet-visited columns through the upper Cholesky factor of H⁻¹ (optimal brain surgeon
updates), in blocks so that the bulk of the work is one matrix product per block.
"""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.patterns import SparsityPattern, topk_mask
from hasslefree.sparse.refit import refit_on_support


def sparsegpt_prune(
    target: torch.Tensor,
    hessian: PreparedHessian,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    adaptive_mask: bool = True,
    refit_iterations: int = 0,
) -> torch.Tensor:
    """Prune ``target`` (out x in) to ``pattern`` with SparseGPT's blocked OBS updates.

    N:M masks are chosen at the start of every group of M columns, from the weights as
    updated so far. Unstructured/row masks are chosen per block (``adaptive_mask``, the
    original behaviour, budget shared across blocks in proportion to their width) or once
    up front (``adaptive_mask=False``), which with H = I is exactly magnitude pruning.
    ``refit_iterations`` > 0 then re-solves the kept weights on the found support (PCG):
    SparseGPT's lazy updates leave them short of the least-squares optimum.
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
    kept = torch.zeros_like(weight, dtype=torch.bool)
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

        if pattern.kind == "nm":
            _nm_block(block, keep, errors, hinv_block, pattern)
        else:
            _columns(block, keep, errors, hinv_block, 0, end - start)
        weight[:, start:end] = block * keep
        kept[:, start:end] = keep
        weight[:, end:] -= errors @ hinv[start:end, end:]
    if refit_iterations > 0:
        goal = target.to(weight.dtype).clone()
        goal[:, hessian.dead] = 0  # inputs never seen stay pruned, as above
        weight = refit_on_support(goal, hessian.damped, kept, weight, iterations=refit_iterations)
    return weight.to(target.dtype)


def _nm_block(block: torch.Tensor, keep: torch.Tensor, errors: torch.Tensor,
              hinv_block: torch.Tensor, pattern: SparsityPattern) -> None:
    """One block of N:M SparseGPT, a group of M columns at a time.

    With the group's mask fixed, its OBS updates are the recurrence
    e_c = (w_c − Σ_{j<c} e_j U_jc) · [c pruned] / U_cc, and everything right of the group
    receives the errors in one product. Working on the transposed block keeps each column
    contiguous, so a group costs a few vector operations instead of a few per column: the
    loop is bound by per-operation overhead, not arithmetic.
    """
    m, n = pattern.m, pattern.n
    width = block.shape[1]
    columns = block.mT.contiguous()                      # (width, rows)
    errs = torch.zeros_like(columns)
    kept = torch.zeros_like(columns, dtype=torch.bool)
    diag = hinv_block.diagonal()
    inv_diag = diag.reciprocal().unsqueeze(1)
    diag_sq = diag.square().unsqueeze(1)
    for i in range(0, width, m):
        j = i + m
        group, err, mask = columns[i:j], errs[i:j], kept[i:j]
        if n > 0:
            mask.scatter_(0, (group.square() / diag_sq[i:j]).topk(n, dim=0).indices, True)
        coef = (~mask) * inv_diag[i:j]
        upper = hinv_block[i:j, i:j]
        torch.mul(group[0], coef[0], out=err[0])
        for c in range(1, m):
            torch.mul(group[c] - upper[:c, c] @ err[:c], coef[c], out=err[c])
        columns[i:].addmm_(hinv_block[i:j, i:].mT, err, alpha=-1)
    block.copy_(columns.mT)
    errors.copy_(errs.mT)
    keep.copy_(kept.mT)


def _columns(block: torch.Tensor, keep: torch.Tensor, errors: torch.Tensor,
             hinv_block: torch.Tensor, first: int, last: int) -> None:
    """Prune columns first..last-1 of ``block`` in order, spreading each error rightwards."""
    diag = hinv_block.diagonal()
    for i in range(first, last):
        error = block[:, i] * (~keep[:, i]) / diag[i]
        block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
        errors[:, i] = error


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

