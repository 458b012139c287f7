"""hasslefree: one-shot sparse + low-rank compression of LLM linear layers.

Each linear layer W is approximated by W_S + U Vᵀ with W_S in a sparsity pattern (N:M or
unstructured) and rank(U Vᵀ) ≤ r, minimising the layer's output error on calibration data,
tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = XᵀX.
"""

from hasslefree.decompose import Decomposition, decompose_group, decompose_layer, resolve_layer
from hasslefree.hessian import HessianAccumulator, PreparedHessian, prepare_hessian
from hasslefree.objective import layer_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import PRESETS
from hasslefree.rank_policy import RankPolicy, parameter_count

# Method packages register their checkpoint codecs on import; the checkpoint format knows none.
from hasslefree import hss as _hss  # noqa: E402,F401  (HSSLinear's codec)

from hasslefree.version import __version__  # noqa: E402

__all__ = [
    "Decomposition",
    "HessianAccumulator",
    "PRESETS",
    "PreparedHessian",
    "RankPolicy",
    "SparsityPattern",
    "decompose_group",
    "decompose_layer",
    "layer_objective",
    "parameter_count",
    "prepare_hessian",
    "resolve_layer",
    "__version__",
]
