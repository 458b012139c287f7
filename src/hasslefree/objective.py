"""The layer objective f = tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖X (W − Ŵ)ᵀ‖²_F.

Evaluated as the expanded trace Σ (E H) ∘ E with E = W − Ŵ: an (out x in) product, never
an (out x out) matrix, so it costs the same as one forward pass over H.
"""

from __future__ import annotations

import torch


def layer_objective(weight: torch.Tensor, approx: "torch.Tensor | object",
                    hessian: torch.Tensor) -> float:
    """f(Ŵ) for ``approx`` given as a dense (out x in) tensor or anything with ``to_dense()``."""
    dense = approx.to_dense() if hasattr(approx, "to_dense") and not isinstance(approx, torch.Tensor) else approx
    if dense.shape != weight.shape:
        raise ValueError(f"approximation shape {tuple(dense.shape)} != weight shape {tuple(weight.shape)}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"Hessian shape {tuple(hessian.shape)} does not match the weight's {weight.shape[1]} inputs"
        )
    error = weight.to(hessian.dtype) - dense.to(hessian.dtype)
    return float(((error @ hessian) * error).sum())


def residual_objective(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H Eᵀ) for an already-formed residual E (the hot path inside the loop)."""
    return float(((error @ hessian) * error).sum())
