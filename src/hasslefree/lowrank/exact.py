"""The exact P2: one SVD in the space whitened by a Cholesky factor of H.

With H = L Lᵀ, tr((T − M) H (T − M)ᵀ) = ‖T L − M L‖²_F, and M ↦ M L is a bijection that
preserves rank, so M* = C_r(T L) L⁻¹ (Theorem 4.1 is the diagonal case). A randomized SVD
of rank r + oversampling, warm started from the previous subspace, makes it cheap.
"""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian
from hasslefree.lowrank.svd import split_factors


def exact_lowrank(
    target: torch.Tensor,
    hessian: PreparedHessian,
    rank: int,
    *,
    warm: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    randomized: bool = False,
    oversample: int = 16,
    power_iterations: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` minimiser of tr((T − M) H (T − M)ᵀ) for the damped H, as (U, V).

    ``randomized`` never forms T L: it only multiplies T and L by thin (r + oversample)
    blocks, O((out + in) · in · r) instead of O(out · in²).
    """
    chol = hessian.chol.to(target.dtype)
    if randomized and rank + oversample < min(target.shape):
        left, singular, right = _randomized_svd(target, chol, rank + oversample, power_iterations,
                                                warm, generator)
    else:
        left, singular, right_t = torch.linalg.svd(target @ chol, full_matrices=False)
        right = right_t.mT
    u, v_white = split_factors(left, singular, right, rank)
    # V = L⁻ᵀ Q Σ^½ so that U Vᵀ = P Σ Qᵀ L⁻¹.
    v = torch.linalg.solve_triangular(chol.mT, v_white, upper=True)
    return u, v


def _randomized_svd(target: torch.Tensor, chol: torch.Tensor, width: int, power_iterations: int,
                    warm: tuple[torch.Tensor, torch.Tensor] | None,
                    generator: torch.Generator | None):
    """Halko et al. range finder for Z = T L, applied as products with T and L only.

    The previous right factor, whitened (Lᵀ V), seeds the sketch: the subspace moves little
    between alternating iterations, so a warm sketch needs fewer power iterations.
    """
    cols = target.shape[1]
    sketch = torch.randn(cols, width, generator=generator, dtype=target.dtype).to(target.device)
    if warm is not None and warm[1].shape[1] > 0:
        previous = chol.mT @ warm[1]
        take = min(previous.shape[1], width)
        sketch[:, :take] = previous[:, :take]
    basis = torch.linalg.qr(target @ (chol @ sketch)).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(chol.mT @ (target.mT @ basis)).Q
        basis = torch.linalg.qr(target @ (chol @ basis)).Q
    small = (basis.mT @ target) @ chol
    left_small, singular, right_t = torch.linalg.svd(small, full_matrices=False)
    return basis @ left_small, singular, right_t.mT
