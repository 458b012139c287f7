"""Exact refit of a sparse matrix on a fixed support with the full Hessian.

Given a support, min tr((T − S) H (T − S)ᵀ) over S on that support is a least-squares
problem per output row (rows are independent). Preconditioned conjugate gradients with a
Jacobi preconditioner solve all rows at once without forming any per-row system.
"""

from __future__ import annotations

import torch


def refit_on_support(target: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                     start: torch.Tensor | None = None, *, iterations: int = 30,
                     tolerance: float = 1e-10) -> torch.Tensor:
    """Minimise tr((T − S) H (T − S)ᵀ) over S with zeros off ``mask`` by batched PCG."""
    mask_f = mask.to(hessian.dtype)
    sparse = (target if start is None else start).to(hessian.dtype) * mask_f
    precond = 1.0 / hessian.diagonal().clamp_min(torch.finfo(hessian.dtype).tiny)
    residual = ((target.to(hessian.dtype) - sparse) @ hessian) * mask_f
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(1)
    initial = rz.clamp_min(torch.finfo(hessian.dtype).tiny)
    for _ in range(iterations):
        hd = (direction @ hessian) * mask_f
        curvature = (direction * hd).sum(1)
        active = curvature > 0
        alpha = torch.where(active, rz / curvature.where(active, torch.ones_like(curvature)),
                            torch.zeros_like(rz))
        sparse += alpha.unsqueeze(1) * direction
        residual -= alpha.unsqueeze(1) * hd
        z = residual * precond
        rz_new = (residual * z).sum(1)
        if bool((rz_new <= tolerance * initial).all()):
            break
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = z + beta.unsqueeze(1) * direction
        rz = rz_new
    return sparse.to(target.dtype)
