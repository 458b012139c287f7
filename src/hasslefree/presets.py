"""Named methods: which P1 and P2 solver, in which order, for how many iterations.

Prior methods are special cases of the alternating loop: pruning alone has no P2; OATS is
the diagonal-H P1 (Wanda) with the diagonal-H P2 (scaled SVD), low-rank step first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    sparse: str
    lowrank: str | None
    iterations: int
    start: str = "sparse"
    tolerance: float = 0.0  # early stop when the relative improvement over 5 iterations is below
    sparse_options: dict = field(default_factory=dict)
    lowrank_options: dict = field(default_factory=dict)
    loop_options: dict = field(default_factory=dict)
    description: str = ""

    @property
    def prunes_only(self) -> bool:
        return self.lowrank is None


PRESETS: dict[str, Method] = {m.name: m for m in [
    Method("magnitude", "magnitude", None, 1, description="magnitude pruning (H = I)"),
    Method("wanda", "wanda", None, 1, description="Wanda pruning (diagonal H)"),
    Method("sparsegpt", "sparsegpt", None, 1, description="SparseGPT pruning (full H)"),
    Method("alps", "alps", None, 1, description="ALPS pruning (ADMM, full H)"),
    Method("magnitude-svd", "magnitude", "svd", 80, start="lowrank",
           description="data-free sparse + truncated SVD"),
    Method("oats", "wanda", "scaled-svd", 80, start="lowrank",
           description="OATS: diagonal-H P1 and P2 (Wanda + scaled SVD)"),
    Method("hassle-free", "sparsegpt", "adam", 80,
           lowrank_options={"steps": 50, "lr": 1e-2, "scaled": True},
           description="the paper: SparseGPT + scaled Adam on U, V"),
    # start="auto" probes both orders: where U Vᵀ can carry almost the whole layer (k_proj at
    # rank 64) pruning W first stalls above OATS; elsewhere pruning first ends lower.
    Method("hassle-free-exact", "sparsegpt", "exact", 80, start="auto",
           description="SparseGPT + the exact P2 (SVD whitened by chol(H)), better start per layer"),
    # The fastest: the exact P2 through a warm-started randomized SVD (thin products only, one
    # power iteration); SparseGPT chooses the support every 5th iteration and in between the
    # kept weights are re-solved jointly with U on that support (6 PCG steps), which both
    # costs less than a pruning pass and converges in fewer iterations. The order probe is
    # shortened to 3 iterations.
    Method("hassle-free-fast", "sparsegpt", "exact", 35, start="auto",
           lowrank_options={"randomized": True, "power_iterations": 1},
           loop_options={"refresh_every": 5, "refine_iterations": 6, "probe": 3},
           description="SparseGPT every 5th iteration, support refits in between, randomized exact P2, 35 iterations"),
    Method("hassle-free-alps", "alps", "exact", 20, start="auto",
           description="ALPS + the exact P2"),
]}


def get_method(name: str) -> Method:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}") from None
