"""A straightforward implementation of the published HASSLE-free loop, for speed baselines.

It follows the reference algorithm as written: a SparseGPT pass with the per-column loop,
then 50 Adam steps (fresh optimiser, η/(t+10)) on the scaled trace objective computed with
autograd in the paper's (in x out) orientation, which forms an (out x out) matrix each step.
Only benchmarks use it; the library's solvers live in ``hasslefree.sparse``/``lowrank``.
"""

from __future__ import annotations

import torch


def sparsegpt_pass(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int,
                   blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT N:M (keep n of m) on ``weight`` (out x in), column by column."""
    w = weight.clone()
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if i % m == 0:
                tmp = w1[:, i:i + m] ** 2 / torch.diag(hinv1)[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


def adam_steps(target_paper: torch.Tensor, hessian: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
               steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled Adam on tr((DW − UVᵀ)ᵀ D⁻¹HD⁻¹ (DW − UVᵀ)); paper orientation W (in x out)."""
    d = hessian.diagonal().sqrt()
    h_scaled = hessian / d.unsqueeze(0) / d.unsqueeze(1)
    goal = target_paper * d.unsqueeze(1)
    u = (u * d.unsqueeze(1)).clone().requires_grad_(True)
    v = v.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u, v], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        residual = goal - u @ v.T
        loss = torch.trace(residual.T @ h_scaled @ residual)  # (out x out) inside the trace
        loss.backward()
        optimizer.step()
    return (u.detach() / d.unsqueeze(1)), v.detach()


def official_loop(weight: torch.Tensor, hessian: torch.Tensor, rank: int, n: int, m: int,
                  iterations: int = 80, steps: int = 50, lr: float = 1e-2, seed: int = 0,
                  percdamp: float = 0.01) -> tuple[list[float], list[float]]:
    """The published alternating loop; returns (best objective so far, elapsed seconds) per iteration.

    Start as the reference: the input-side factor Kaiming-uniform (LoRA default, alpha 16), the
    output-side factor zero, a fresh Adam per iteration at lr / (t + 10), t from 0. The
    objective is the true one, tr(E XᵀX Eᵀ), on the undamped Hessian.
    """
    import time

    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = weight.shape
    damped = hessian.clone()
    dead = damped.diagonal() == 0
    damped[dead, dead] = 1
    damped += percdamp * damped.diagonal().mean() * torch.eye(in_features, dtype=hessian.dtype)
    bound = (16.0 / rank) ** 0.5 / in_features ** 0.5
    u = (torch.rand(in_features, rank, generator=gen) * 2 - 1) * bound  # paper orientation: in x r
    v = torch.zeros(out_features, rank)
    best, history, times = float("inf"), [], []
    began = time.perf_counter()
    for t in range(iterations):
        sparse = sparsegpt_pass(weight - (u @ v.T).T, hessian, n, m, percdamp=percdamp)
        u, v = adam_steps((weight - sparse).T.contiguous(), damped, u, v, steps, lr / (t + 10))
        error = weight - sparse - (u @ v.T).T
        best = min(best, float(torch.sum((error @ hessian) * error)))
        history.append(best)
        times.append(time.perf_counter() - began)
    return history, times
