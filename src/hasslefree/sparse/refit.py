"""Exact refit of a sparse matrix on a fixed support with the full Hessian.

Given a support, min tr((T − S) H (T − S)ᵀ) over S on that support is a least-squares
problem per output row (rows are independent). Preconditioned conjugate gradients with a
Jacobi preconditioner solve all rows at once without forming any per-row system.
"""

from __future__ import annotations

import torch


def refit_on_support(target: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                     start: torch.Tensor | None = None, *, iterations: int = 30,
                     tolerance: float = 1e-10, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise tr((T − S) H (T − S)ᵀ) over S with zeros off ``mask`` by batched PCG.

    With ``basis`` (in x r) the objective is min over S and any U of
    tr((T − S − U basisᵀ) H (T − S − U basisᵀ)ᵀ): U is eliminated, which replaces H by
    H − H B (Bᵀ H B)⁻¹ Bᵀ H (B = basis), applied as H plus a rank-r correction.
    """
    apply = _hessian_product(hessian, basis)
    mask_f = mask.to(hessian.dtype)
    sparse = (target if start is None else start).to(hessian.dtype) * mask_f
    precond = 1.0 / hessian.diagonal().clamp_min(torch.finfo(hessian.dtype).tiny)
    residual = apply(target.to(hessian.dtype) - sparse).mul_(mask_f)
    z = residual * precond
    direction = z.clone()
    rz = _row_dot(residual, z)
    initial = rz.clamp_min(torch.finfo(hessian.dtype).tiny)
    # Few, in-place operations per step: at small widths the step is bound by passes over
    # memory, not by the product with H.
    for _ in range(iterations):
        hd = apply(direction).mul_(mask_f)
        curvature = _row_dot(direction, hd)
        alpha = torch.where(curvature > 0, rz / curvature.where(curvature > 0, torch.ones_like(curvature)),
                            torch.zeros_like(rz)).unsqueeze(1)
        sparse.addcmul_(alpha, direction)
        residual.addcmul_(alpha, hd, value=-1)
        torch.mul(residual, precond, out=z)
        rz_new = _row_dot(residual, z)
        if bool((rz_new <= tolerance * initial).all()):
            break
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, torch.ones_like(rz)), torch.zeros_like(rz))
        direction.mul_(beta.unsqueeze(1)).add_(z)
        rz = rz_new
    return sparse.to(target.dtype)


def coefficients_for_basis(residual: torch.Tensor, hessian: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """argmin over U of tr((R − U Bᵀ) H (R − U Bᵀ)ᵀ) = R H B (Bᵀ H B)⁻¹ (B = ``basis``, in x r).

    The U that the eliminated refit assumed: pairing it with the refitted S keeps the
    recorded iterate the one the refit optimised.
    """
    if basis.shape[1] == 0:
        return residual.new_zeros(residual.shape[0], 0)
    h = hessian.to(residual.dtype)
    b = basis.to(residual.dtype)
    hb = h @ b
    gram = b.mT @ hb
    gram.diagonal().add_(100 * torch.finfo(gram.dtype).eps * float(gram.diagonal().mean()))
    return torch.cholesky_solve((residual @ hb).mT, torch.linalg.cholesky(gram)).mT


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row, without an (out x in) temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(a.shape[0])


def _hessian_product(hessian: torch.Tensor, basis: torch.Tensor | None):
    """x ↦ x H, or x ↦ x (H − H B (Bᵀ H B)⁻¹ Bᵀ H) when a low-rank row basis B is eliminated."""
    if basis is None or basis.shape[1] == 0:
        return lambda x: x @ hessian
    hb = hessian @ basis.to(hessian.dtype)
    gram = basis.to(hessian.dtype).mT @ hb
    # a jitter at rounding level keeps the factorisation defined when V has dependent columns
    gram.diagonal().add_(100 * torch.finfo(gram.dtype).eps * float(gram.diagonal().mean()))
    chol = torch.linalg.cholesky(gram)
    coupling = torch.cholesky_solve(hb.mT, chol)          # (r, in) = G⁻¹ Bᵀ H
    return lambda x: (x @ hessian).sub_((x @ hb) @ coupling)
