"""A transformers tokenizer backed directly by a sentencepiece ``.model`` file.

transformers 5 converts sentencepiece files into a `tokenizers` BPE, which needs protobuf
and does not reproduce every sentencepiece option (``tok512.model`` collapses repeated
spaces, for instance). Running sentencepiece itself keeps token ids identical to the
tokenizer the model was trained with, while callers still get the usual
``encode``/``decode``/``__call__`` interface.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizer

try:  # transformers >= 5
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend as _Base
except ImportError:  # pragma: no cover - transformers 4.x ships a sentencepiece LlamaTokenizer
    from transformers import LlamaTokenizer as _Base


class SentencePieceTokenizer(_Base):
    """Sentencepiece tokenizer with llama2.c conventions.

    No BOS/EOS are added by default (the evaluation protocol tokenises whole files without
    them), and special-token strings in the text (e.g. PTB's literal ``<unk>``) are encoded
    as plain text, exactly as ``sentencepiece`` does.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode through sentencepiece so byte-fallback pieces become real characters."""
        return self.sp_model.decode_pieces(tokens)


def load_sentencepiece_tokenizer(model_file: str | Path) -> PreTrainedTokenizer:
    """Build a :class:`SentencePieceTokenizer` from a sentencepiece ``.model`` file."""
    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"sentencepiece model {path} does not exist")
    return SentencePieceTokenizer(
        vocab_file=str(path),
        legacy=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
    )
