"""Whole-model compression: the sequential pipeline and its run reports.

``compress(model, tokenizer, ...)`` walks the decoder blocks one at a time, fits every
targeted linear layer to calibration activations that already flow through the compressed
earlier layers, and swaps in :class:`hasslefree.nn.SparseLowRankLinear` modules (or
:class:`hasslefree.hss.HSSLinear` for the HSS methods).
"""

from hasslefree.pipeline.api import check_calibration, compress, prepare
from hasslefree.pipeline.matching import MATCH_TARGETS, MatchOptions
from hasslefree.pipeline.match_existing import match_compressed
from hasslefree.pipeline.recipe import EngineOptions, Recipe
from hasslefree.pipeline.plan import DEFAULT_SKIP, LayerSettings, Plan, TargetLayer, build_plan
from hasslefree.architectures import ARCHITECTURES, Architecture, lookup, resolve_architecture
from hasslefree.pipeline.report import CompressionReport, LayerRecord
from hasslefree.pipeline.resume import ResumeMismatch

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CompressionReport",
    "DEFAULT_SKIP",
    "EngineOptions",
    "LayerRecord",
    "LayerSettings",
    "MATCH_TARGETS",
    "MatchOptions",
    "Plan",
    "Recipe",
    "ResumeMismatch",
    "TargetLayer",
    "build_plan",
    "check_calibration",
    "compress",
    "lookup",
    "match_compressed",
    "prepare",
    "resolve_architecture",
]
