"""The layer Hessian H = XᵀX: accumulation, dead inputs, damping and a robust Cholesky.

H is the only thing the layer solvers need from the calibration data, so it is built once
per distinct layer input (q/k/v share one) and reused across all alternating iterations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


class HessianAccumulator:
    """Mean of xᵀx over calibration tokens, from activations of any leading shape.

    A mean (rather than a sum) keeps the scale independent of the calibration size, so
    damping and learning rates need no retuning when nsamples changes. Each batch's xᵀx is
    taken in ``dtype`` and added into a float64 sum (where the device has float64): the sum
    then barely depends on the order of the batches, so the calibration can be split across
    processes (:meth:`merge_from`) and give the same ``hessian`` as one process.
    """

    def __init__(self, in_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.dtype = dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        wide = torch.float64 if device.type in ("cpu", "cuda") else dtype
        self.total = torch.zeros(in_features, in_features, device=device, dtype=wide)
        self.tokens = 0

    @torch.no_grad()
    def add(self, activations: torch.Tensor) -> None:
        """Fold in a batch of inputs shaped (..., in_features)."""
        if activations.shape[-1] != self.in_features:
            raise ValueError(
                f"activation width {activations.shape[-1]} does not match the layer's "
                f"{self.in_features} inputs"
            )
        x = activations.reshape(-1, self.in_features).to(self.total.device, self.dtype)
        if x.shape[0] == 0:
            return
        self.total.add_(x.T @ x)
        self.tokens += x.shape[0]

    def merge_from(self, total: torch.Tensor, tokens: int) -> None:
        """Replace the sum by one over all processes' tokens (see :mod:`hasslefree.pipeline.distributed`)."""
        self.total, self.tokens = total, tokens

    @property
    def hessian(self) -> torch.Tensor:
        """The mean xᵀx so far, in ``dtype`` (zeros before any token)."""
        if self.tokens == 0:
            return torch.zeros_like(self.total, dtype=self.dtype)
        return (self.total / self.tokens).to(self.dtype)


@dataclass
class PreparedHessian:
    """H ready for the solvers.

    ``raw`` is the (dead-input-fixed) XᵀX that defines the true objective; ``damped`` adds
    λI (+ optional per-coordinate term) for the solvers; ``chol`` is its lower Cholesky
    factor; ``dead`` flags inputs that never fire (their weight columns are irrelevant).
    """

    raw: torch.Tensor
    damped: torch.Tensor
    chol: torch.Tensor
    dead: torch.Tensor
    damping: float
    _inverse_upper: torch.Tensor | None = field(default=None, repr=False)
    _eigen: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def diag_sqrt(self) -> torch.Tensor:
        """D = sqrt(diag(H)) of the damped Hessian (the paper's diagonal scaling)."""
        return self.damped.diagonal().sqrt()

    def inverse(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.chol)

    def inverse_cholesky_upper(self) -> torch.Tensor:
        """Upper Cholesky factor of H⁻¹ (SparseGPT's row-wise OBS weights), cached.

        H is fixed across all alternating iterations, so this is paid once per layer.
        """
        if self._inverse_upper is None:
            self._inverse_upper = torch.linalg.cholesky(self.inverse(), upper=True)
        return self._inverse_upper

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the damped H (ALPS's ridge solves), cached."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.damped)
        return self._eigen


def prepare_hessian(
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    coordinate_damp: float = 0.0,
    dtype: torch.dtype | None = None,
    max_tries: int = 12,
) -> PreparedHessian:
    """Fix dead inputs, damp, and factor H, escalating damping until Cholesky succeeds.

    Dead inputs (H_jj = 0, the paper's Assumption 1) get H_jj = 1 so D = sqrt(diag H) is
    invertible; their columns carry no signal, which the objective already reflects.
    Damping is ``percdamp * mean(diag H) * I + coordinate_damp * diag(H)``.
    """
    work = hessian.to(dtype or hessian.dtype).clone()
    diag = work.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    raw = work.clone()
    mean_diag = float(diag.mean())
    damping = percdamp * mean_diag
    for attempt in range(max_tries):
        damped = raw.clone()
        damped.diagonal().add_(damping + coordinate_damp * raw.diagonal())
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            if attempt:
                logger.warning("Cholesky needed damping %.3g (x%d escalation)", damping, attempt)
            return PreparedHessian(raw=raw, damped=damped, chol=chol, dead=dead, damping=damping)
        damping = damping * 10.0 if damping > 0 else 1e-6 * abs(mean_diag)
    raise ValueError(
        f"Hessian is not positive definite even with damping {damping:.3g}; "
        "check the calibration activations for NaN/Inf or a degenerate layer"
    )
