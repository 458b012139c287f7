"""The paper's P2: Adam on the factors U, V (Algorithm 1), optionally diagonally scaled.

The gradient of f(U, V) = tr((T − UVᵀ) H (T − UVᵀ)ᵀ) is −2 G V and −2 Gᵀ U with
G = T H − U (Vᵀ H): (out x in) and (r x in) products only, never an (out x out) matrix.
Scaling (Eq. 7) runs Adam on D-scaled coordinates where diag(H) = 1, which lets one
learning rate serve every layer; it changes the steps, not the minimiser.
"""

from __future__ import annotations

import torch

from hasslefree.hessian import PreparedHessian


def adam_lowrank(
    target: torch.Tensor,
    hessian: PreparedHessian,
    rank: int,
    *,
    warm: tuple[torch.Tensor, torch.Tensor] | None = None,
    iteration: int = 1,
    generator: torch.Generator | None = None,
    steps: int = 50,
    lr: float = 1e-2,
    scaled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Adam steps from ``warm`` with the paper's rate η / (iteration + 9).

    The rate matches the reference implementation, which counts iterations from 0
    (η/10 in the first). Without a warm start the factors start as a LoRA adapter does in
    that implementation: U = 0 and V uniform in ±sqrt(16/r)/sqrt(in) (Kaiming-uniform,
    alpha 16), so U Vᵀ = 0 and the first alternating iteration is plain pruning.
    """
    dtype = target.dtype
    h = hessian.damped.to(dtype)
    if warm is None:
        bound = (16.0 / rank) ** 0.5 / target.shape[1] ** 0.5
        v = (torch.rand(target.shape[1], rank, generator=generator, dtype=dtype) * 2 - 1).to(target.device) * bound
        u = torch.zeros(target.shape[0], rank, dtype=dtype, device=target.device)
    else:
        u, v = warm[0].to(dtype).clone(), warm[1].to(dtype).clone()
    scale = None
    goal = target
    if scaled:
        scale = h.diagonal().sqrt()
        h = h / scale.unsqueeze(0) / scale.unsqueeze(1)
        goal = target * scale
        v = v * scale.unsqueeze(1)
    u_param = torch.nn.Parameter(u)
    v_param = torch.nn.Parameter(v)
    optimizer = torch.optim.Adam([u_param, v_param], lr=lr / (iteration + 9))
    goal_h = goal @ h
    with torch.no_grad():
        for _ in range(steps):
            residual_h = goal_h - u_param @ (v_param.mT @ h)
            u_param.grad = -2.0 * residual_h @ v_param
            v_param.grad = -2.0 * residual_h.mT @ u_param
            optimizer.step()
    u, v = u_param.detach(), v_param.detach()
    if scale is not None:
        v = v / scale.unsqueeze(1)
    return u, v
