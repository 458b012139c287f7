"""``HSSLinear``: a Linear layer stored as sparse S plus a permuted HSS matrix, and its builder."""

from __future__ import annotations

import logging
import math
import operator
import warnings

import torch
from torch import Tensor, nn

from .budget import RankRule, outer_rank_for_budget
from .construct import DATA_AWARE_VARIANTS, VARIANTS, HSSDecomposition, SparsePart, decompose
from .matrix import HSSMatrix

__all__ = ["HSSLinear", "compress_linear_hss", "DEFAULT_OUTER_RANK"]

logger = logging.getLogger(__name__)

DEFAULT_OUTER_RANK = 512


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR is beta" is noise for every forward
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def _refresh_after_load(module: "HSSLinear", _incompatible_keys) -> None:
    """Module-level (picklable) hook: permutations may change in ``load_state_dict``."""
    module._refresh_permutations()


class HSSLinear(nn.Module):
    """``y = x @ (S + P_r^T A P_c)^T + b`` with S sparse (CSR) and A an :class:`HSSMatrix`.

    ``row_perm[p]`` / ``col_perm[p]`` is the original row / column at permuted position p;
    the HSS matrix lives in permuted order and its output is scattered back, so callers
    only ever see the original index order.
    """

    def __init__(
        self,
        sparse: SparsePart,
        row_perm: Tensor,
        col_perm: Tensor,
        hss: HSSMatrix,
        bias: Tensor | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = dict(config or {})  # how it was built (JSON-able), kept for checkpoints and logs
        self.out_features, self.in_features = sparse.shape
        if hss.shape != sparse.shape:
            raise ValueError(f"S is {sparse.shape} but HSS is {hss.shape}")
        for name, perm, size in (("row_perm", row_perm, self.out_features), ("col_perm", col_perm, self.in_features)):
            if perm.numel() != size or not torch.equal(perm.sort().values.cpu(), torch.arange(size)):
                raise ValueError(f"{name} is not a permutation of range({size})")
        self.register_buffer("s_crow", sparse.crow.to(torch.int64))
        self.register_buffer("s_col", sparse.col.to(torch.int64))
        self.s_values = nn.Parameter(sparse.values.clone())
        self.register_buffer("row_perm", row_perm.to(torch.int64))
        self.register_buffer("col_perm", col_perm.to(torch.int64))
        self.register_buffer("row_perm_inv", torch.empty_like(self.row_perm), persistent=False)
        self._refresh_permutations()
        # load_state_dict may bring other permutations: recompute what is derived from them.
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.hss = hss
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def _refresh_permutations(self) -> None:
        """Inverse row order and identity flags (identity orders skip the gathers)."""
        with torch.no_grad():
            self.row_perm_inv[self.row_perm] = torch.arange(self.out_features, device=self.row_perm.device)
        self.identity_rows = bool(torch.equal(self.row_perm.cpu(), torch.arange(self.out_features)))
        self.identity_cols = bool(torch.equal(self.col_perm.cpu(), torch.arange(self.in_features)))

    @classmethod
    def from_decomposition(cls, dec: HSSDecomposition, bias: Tensor | None = None, config: dict | None = None) -> "HSSLinear":
        return cls(dec.sparse, dec.row_perm, dec.col_perm, dec.hss, bias, {"variant": dec.variant, **(config or {})})

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def sparse_weight(self) -> Tensor:
        """S as a torch sparse tensor (original index order): CSR, or COO for float16/bfloat16
        on the CPU, whose CSR product kernels lack those types."""
        if self.s_values.device.type == "cpu" and self.s_values.dtype in (torch.float16, torch.bfloat16):
            rows = torch.repeat_interleave(torch.arange(self.out_features), self.s_crow.diff())
            # CSR order is row-major with unique entries: already coalesced.
            return torch.sparse_coo_tensor(torch.stack([rows, self.s_col]), self.s_values, self.shape,
                                           is_coalesced=True, check_invariants=False)
        return _csr(self.s_crow, self.s_col, self.s_values, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = (self.sparse_weight() @ x2.T).T
        xp = x2 if self.identity_cols else x2[:, self.col_perm]
        z = self.hss.matmul(xp)
        y = y + (z if self.identity_rows else z[:, self.row_perm_inv])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> Tensor:
        """W_hat in the original order (tests and diagnostics)."""
        with torch.no_grad():
            inv_c = torch.empty_like(self.col_perm)
            inv_c[self.col_perm] = torch.arange(self.in_features, device=inv_c.device)
            dense = self.hss.to_dense()[self.row_perm_inv][:, inv_c]
            return dense + self.sparse_weight().to_dense()

    def parameter_count(self, include_bias: bool = True) -> int:
        """Nonzeros of S + HSS parameters (+ bias). Indices of S are not counted."""
        n = self.s_values.numel() + self.hss.parameter_count()
        if include_bias and self.bias is not None:
            n += self.bias.numel()
        return n

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.s_values.numel()}, bias={self.bias is not None}"

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        """Flat tensors plus JSON-able spec, for a safetensors + JSON checkpoint codec."""
        tensors, hss_spec = self.hss.to_state(prefix="hss.")
        tensors.update(
            {
                "s_crow": self.s_crow.contiguous(),
                "s_col": self.s_col.contiguous(),
                "s_values": self.s_values.detach().contiguous(),
                "row_perm": self.row_perm.contiguous(),
                "col_perm": self.col_perm.contiguous(),
            }
        )
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().contiguous()
        spec = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dtype": str(self.s_values.dtype).removeprefix("torch."),
            "nnz": self.s_values.numel(),
            "bias": self.bias is not None,
            "config": self.config,
            "hss": hss_spec,
        }
        return tensors, spec

    @staticmethod
    def state_shapes(spec: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape, dtype name) of every tensor :meth:`to_state` writes, from the spec alone."""
        m, n, dtype = int(spec["out_features"]), int(spec["in_features"]), spec["dtype"]
        out = {name: (shape, dtype) for name, shape in HSSMatrix.state_shapes(spec["hss"], prefix="hss.").items()}
        nnz = int(spec["nnz"])
        out.update(
            s_crow=((m + 1,), "int64"),
            s_col=((nnz,), "int64"),
            s_values=((nnz,), dtype),
            row_perm=((m,), "int64"),
            col_perm=((n,), "int64"),
        )
        if spec.get("bias"):
            out["bias"] = ((m,), dtype)
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], spec: dict) -> "HSSLinear":
        shape = (int(spec["out_features"]), int(spec["in_features"]))
        sparse = SparsePart(shape, tensors["s_crow"], tensors["s_col"], tensors["s_values"])
        hss = HSSMatrix.from_state(tensors, spec["hss"], prefix="hss.")
        bias = tensors["bias"] if spec.get("bias") else None
        return cls(sparse, tensors["row_perm"], tensors["col_perm"], hss, bias, spec.get("config"))


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _is_int(value) -> bool:
    """Python and numpy integers (a benchmark may pass either), but not floats or bools."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _validate(weight, bias, sparsity, outer_rank, leaf, min_rank, rank_decay, variant, hessian, budget_params, sweeps, percdamp) -> None:
    """All argument checks, before any work."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or min(weight.shape) < 1:
        raise ValueError(f"weight must be a non-empty 2-D tensor (out, in), got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    m, n = weight.shape
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not _is_int(leaf) or leaf < 1:
        raise ValueError(f"leaf must be an int >= 1, got {leaf}")
    if outer_rank is not None and (not _is_int(outer_rank) or outer_rank < 0):
        raise ValueError(f"outer_rank must be an int >= 0, got {outer_rank}")
    if outer_rank is not None and budget_params is not None:
        raise ValueError("give either outer_rank or budget_params, not both")
    if budget_params is not None and (not _is_int(budget_params) or budget_params < 0):
        raise ValueError(f"budget_params must be an int >= 0, got {budget_params}")
    if not _is_int(min_rank) or min_rank < 0:
        raise ValueError(f"min_rank must be an int >= 0, got {min_rank}")
    if not (0.0 < rank_decay <= 1.0):
        raise ValueError(f"rank_decay must be in (0, 1], got {rank_decay}")
    if not _is_int(sweeps) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0, got {sweeps}")
    if not (percdamp >= 0.0):
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    if variant in DATA_AWARE_VARIANTS and hessian is None:
        raise ValueError(f"variant {variant!r} is data-aware and needs hessian (in x in)")
    if hessian is not None and tuple(hessian.shape) != (n, n):
        raise ValueError(f"hessian must have shape ({n}, {n}), got {tuple(hessian.shape)}")
    _check_finite("weight", weight)
    if bias is not None:
        _check_finite("bias", bias)
    if hessian is not None:
        _check_finite("hessian", hessian)


def compress_linear_hss(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    sparsity: float = 0.3,
    outer_rank: int | None = None,
    leaf: int = 256,
    min_rank: int = 16,
    rank_decay: float = 0.5,
    variant: str = "shss-rcm",
    hessian: Tensor | None = None,
    budget_params: int | None = None,
    sweeps: int = 1,
    percdamp: float = 0.01,
) -> HSSLinear:
    """Compress an (out, in) weight into :class:`HSSLinear`.

    ``outer_rank`` defaults to 512; give ``budget_params`` instead to pick the largest outer
    rank whose stored count (S nonzeros + HSS, bias excluded) fits the budget.
    ``hessian`` is H = X^T X (in x in), required by the ``*-whitened`` variants; it is
    ignored by the others. ``sweeps``/``percdamp`` tune the data-aware fit.
    """
    _validate(weight, bias, sparsity, outer_rank, leaf, min_rank, rank_decay, variant, hessian, budget_params, sweeps, percdamp)
    leaf, min_rank, sweeps = int(leaf), int(min_rank), int(sweeps)
    rule = RankRule(decay=float(rank_decay), min_rank=min_rank)
    shape = tuple(weight.shape)
    if budget_params is not None:
        outer_rank = outer_rank_for_budget(shape, sparsity, int(budget_params), leaf, rule)
        logger.info("budget %d params -> outer rank %d for %s", budget_params, outer_rank, shape)
    elif outer_rank is None:
        outer_rank = DEFAULT_OUTER_RANK
    outer_rank = int(outer_rank)
    dec = decompose(
        weight.detach(),
        sparsity=sparsity,
        outer_rank=outer_rank,
        leaf=leaf,
        rule=rule,
        variant=variant,
        hessian=hessian,
        sweeps=sweeps,
        percdamp=percdamp,
    )
    config = {
        "sparsity": float(sparsity),
        "outer_rank": outer_rank,
        "leaf": leaf,
        "rank_rule": rule.to_spec(),
        "budget_params": None if budget_params is None else int(budget_params),
    }
    if variant in DATA_AWARE_VARIANTS:
        config.update(sweeps=sweeps, percdamp=float(percdamp))
    layer = HSSLinear.from_decomposition(dec, bias, config)
    logger.info(
        "HSS %s %s: outer rank %d, nnz(S) %d, params %d (dense %d)",
        variant, shape, outer_rank, dec.sparse.nnz, layer.parameter_count(include_bias=False), shape[0] * shape[1],
    )
    return layer
