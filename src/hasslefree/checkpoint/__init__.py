"""Compressed checkpoints: safetensors + one JSON config, codecs per module type, exports, size info."""

from hasslefree.checkpoint import linear_codec as _linear_codec  # noqa: F401  (registers the codec)
from hasslefree.checkpoint.errors import CheckpointError
from hasslefree.checkpoint.export import export_dense, export_peft
from hasslefree.checkpoint.format import load_compressed
from hasslefree.checkpoint.save import save_compressed
from hasslefree.checkpoint.info import checkpoint_info, estimate_compression, format_info, info_command
from hasslefree.checkpoint.registry import (
    ModuleCodec,
    codec_for_kind,
    codec_for_module,
    register_codec,
    registered_kinds,
)

__all__ = [
    "CheckpointError",
    "ModuleCodec",
    "checkpoint_info",
    "codec_for_kind",
    "codec_for_module",
    "estimate_compression",
    "export_dense",
    "export_peft",
    "format_info",
    "info_command",
    "load_compressed",
    "register_codec",
    "registered_kinds",
    "save_compressed",
]
