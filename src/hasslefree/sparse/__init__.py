"""P1 solvers: min over W_S in the pattern of tr((T − W_S) H (T − W_S)ᵀ) for a target T.

Each solver is a pure function ``(target, hessian, pattern, *, options...) -> sparse`` where
``target`` is (out x in), ``hessian`` a :class:`~hasslefree.hessian.PreparedHessian`, and
the result has zeros off the pattern. They differ only in how much of H they use.
A solver that declares ``previous`` also gets the last sparse iterate from the alternating
loop, for warm starts (see :mod:`hasslefree.solver_calls`).
"""

from hasslefree.sparse.alps import alps_prune
from hasslefree.sparse.magnitude import magnitude_prune
from hasslefree.sparse.sparsegpt import sparsegpt_prune
from hasslefree.sparse.wanda import wanda_prune

SPARSE_SOLVERS = {
    "magnitude": magnitude_prune,
    "wanda": wanda_prune,
    "sparsegpt": sparsegpt_prune,
    "alps": alps_prune,
}

__all__ = ["SPARSE_SOLVERS", "alps_prune", "magnitude_prune", "sparsegpt_prune", "wanda_prune"]
