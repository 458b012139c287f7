"""Load transformers models: local folders, hub ids (cached or downloadable) and GGUF files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .spm_tokenizer import SentencePieceTokenizer, load_sentencepiece_tokenizer

logger = logging.getLogger(__name__)


def hub_id_is_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache already holds ``config.json`` for ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id and the like
        return False
    return isinstance(hit, str)


def hub_is_offline() -> bool:
    """Whether downloads are disabled (``HF_HUB_OFFLINE=1``)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return True
    return bool(constants.HF_HUB_OFFLINE)


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain float model it is.

    transformers dequantises GGUF tensors into ordinary ``nn.Linear`` weights but still
    tags the model as quantised, which blocks saving and fine-tuning the compressed result.
    """
    if getattr(model, "quantization_method", None) is None and not getattr(model, "is_quantized", False):
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_pretrained(
    source: str | Path,
    *,
    dtype: torch.dtype,
    gguf_file: str | None = None,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` for the model and its tokenizer (GGUF tensors are dequantised)."""
    kwargs: dict = {"local_files_only": local_files_only}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = load_tokenizer(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **kwargs)
    if gguf_file is not None:
        drop_gguf_quantizer(model)
    return model, tokenizer


def load_tokenizer(source: str | Path, gguf_file: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model (our sentencepiece one, or whatever AutoTokenizer reads)."""
    tokenizer = _saved_sentencepiece_tokenizer(source) if gguf_file is None else None
    if tokenizer is None:
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    return tokenizer


def _saved_sentencepiece_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    """Reload a :class:`SentencePieceTokenizer` saved into a local model folder.

    ``AutoTokenizer`` would map the folder's Llama config to the `tokenizers` Llama class,
    which cannot read the sentencepiece file without extra packages (and would change ids).
    """
    folder = Path(source)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        tokenizer_class = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if tokenizer_class != SentencePieceTokenizer.__name__:
        return None
    return load_sentencepiece_tokenizer(folder / "tokenizer.model")
