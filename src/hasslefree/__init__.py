"""hasslefree: one-shot sparse + low-rank compression of LLM linear layers.

Each linear layer W is approximated by W_S + U Vᵀ with W_S in a sparsity pattern (N:M or
unstructured) and rank(U Vᵀ) ≤ r, minimising the layer's output error on calibration data,
tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = XᵀX.

The public API, all importable from here:

* one layer: :func:`decompose_layer`, :func:`decompose_group`, :func:`prepare_hessian`;
* a whole model: :func:`compress`, driven by a :class:`Recipe` (typed, JSON round-trip; with
  :class:`EngineOptions` and :class:`MatchOptions`) or the same settings as keywords, and
  :func:`prepare` (checks a run's settings against a model without doing any work);
  :func:`match_compressed` (block-output matching on a model already compressed);
* checkpoints: :func:`save_compressed`, :func:`load_compressed`, :func:`export_dense`,
  :func:`export_peft`; models by name or path: :func:`load_model`.

The whole-model and checkpoint entries load transformers, so they are imported on first use.
"""

from importlib import import_module
from typing import Any

from hasslefree.decompose import Decomposition, decompose_group, decompose_layer, resolve_layer
from hasslefree.hessian import HessianAccumulator, PreparedHessian, prepare_hessian
from hasslefree.objective import layer_objective
from hasslefree.patterns import SparsityPattern
from hasslefree.presets import PRESETS
from hasslefree.rank_policy import RankPolicy, parameter_count

# Method packages register their checkpoint codecs on import; the checkpoint format knows none.
from hasslefree import hss as _hss  # noqa: E402,F401  (HSSLinear's codec)

from hasslefree.version import __version__  # noqa: E402

_LAZY = {
    "compress": "hasslefree.pipeline",
    "prepare": "hasslefree.pipeline",
    "MatchOptions": "hasslefree.pipeline",
    "match_compressed": "hasslefree.pipeline",
    "Recipe": "hasslefree.pipeline",
    "EngineOptions": "hasslefree.pipeline",
    "CompressionReport": "hasslefree.pipeline",
    "save_compressed": "hasslefree.checkpoint",
    "load_compressed": "hasslefree.checkpoint",
    "export_dense": "hasslefree.checkpoint",
    "export_peft": "hasslefree.checkpoint",
    "load_model": "hasslefree.loading",
}

__all__ = [
    "CompressionReport",
    "Decomposition",
    "EngineOptions",
    "HessianAccumulator",
    "MatchOptions",
    "PRESETS",
    "PreparedHessian",
    "RankPolicy",
    "Recipe",
    "SparsityPattern",
    "compress",
    "decompose_group",
    "decompose_layer",
    "export_dense",
    "export_peft",
    "layer_objective",
    "load_compressed",
    "load_model",
    "match_compressed",
    "parameter_count",
    "prepare",
    "prepare_hessian",
    "resolve_layer",
    "save_compressed",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """The whole-model and checkpoint entries of the API, imported on first use."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hasslefree' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
