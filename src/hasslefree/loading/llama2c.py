"""Read llama2.c checkpoints (legacy ``.bin`` format) into ``transformers.LlamaForCausalLM``.

Layout: a header of 7 int32 ``[dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len]`` (a negative vocab size means the classifier is stored separately, otherwise it
is tied to the token embedding), then float32 arrays in PyTorch (out, in) orientation:
tok_emb, rms_att[L], wq[L], wk[L], wv[L], wo[L], rms_ffn[L], w1[L], w2[L], w3[L],
rms_final, freq_cis_real, freq_cis_imag (skipped: recomputed by the model), [wcls].

llama2.c rotates adjacent pairs (x[2i], x[2i+1]) while the transformers Llama rotates the
two halves of each head, so the rows of wq and wk are permuted per head on the way in.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizer

from .spm_tokenizer import load_sentencepiece_tokenizer

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<7i")
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export versions >= 1
TOKENIZER_FILE = "tok512.model"


@dataclass(frozen=True)
class Llama2cHeader:
    """Model hyper-parameters stored in the checkpoint header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def n_floats(self) -> int:
        """Number of float32 values that must follow the header."""
        d, h, n_l, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        per_layer = 2 * d + d * d + 2 * d * self.kv_dim + d * d + 3 * d * h
        freq = self.seq_len * self.head_size  # real + imaginary halves
        classifier = 0 if self.shared_classifier else v * d
        return v * d + n_l * per_layer + d + freq + classifier


def read_header(path: Path) -> Llama2cHeader:
    """Parse and validate the header, checking the file size matches it."""
    with path.open("rb") as fh:
        raw = fh.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path} is too small to be a llama2.c checkpoint")
    if raw[:2] == b"PK" or raw[:1] == b"\x80":
        raise ValueError(
            f"{path} looks like a PyTorch checkpoint, not a llama2.c one; pass the model's "
            "directory instead"
        )
    values = _HEADER.unpack(raw)
    if values[0] == _VERSIONED_MAGIC:
        raise ValueError(
            f"{path} uses a versioned llama2.c export (magic 'ak42'); only the legacy "
            "(version 0) format is supported - re-export it with `--version 0`"
        )
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = values
    header = Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0)
    sane = (
        min(dim, hidden, n_layers, n_heads, n_kv, header.vocab_size, seq_len) > 0
        and dim % n_heads == 0
        and n_heads % n_kv == 0
        and header.head_size % 2 == 0
    )
    if not sane:
        raise ValueError(f"{path} does not have a valid llama2.c header: {values}")
    expected = _HEADER.size + 4 * header.n_floats()
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} has {actual} bytes but its llama2.c header {values} implies {expected}"
        )
    return header


def interleaved_to_half_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from adjacent-pair RoPE to rotate-half RoPE.

    Within each head, output rows (0, 1, 2, 3, ...) = (pair0.re, pair0.im, pair1.re, ...)
    become (pair0.re, pair1.re, ..., pair0.im, pair1.im, ...).
    """
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _config(h: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_size,
        max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
    )


def load_llama2c_model(path: str | Path) -> LlamaForCausalLM:
    """Build a float32 ``LlamaForCausalLM`` that reproduces the llama2.c forward pass."""
    path = Path(path)
    h = read_header(path)
    data = torch.from_numpy(
        np.fromfile(path, dtype="<f4", offset=_HEADER.size).astype(np.float32, copy=False)
    )
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        t = data[pos : pos + n].view(*shape)
        pos += n
        return t

    d, L, kv = h.dim, h.n_layers, h.kv_dim
    tok_emb = take(h.vocab_size, d)
    rms_att = take(L, d)
    wq, wk, wv, wo = take(L, d, d), take(L, kv, d), take(L, kv, d), take(L, d, d)
    rms_ffn = take(L, d)
    w1, w2, w3 = take(L, h.hidden_dim, d), take(L, d, h.hidden_dim), take(L, h.hidden_dim, d)
    rms_final = take(d)
    take(h.seq_len * h.head_size)  # freq_cis_real and freq_cis_imag: recomputed by the model
    wcls = None if h.shared_classifier else take(h.vocab_size, d)
    assert pos == data.numel(), "header/size check should make this unreachable"

    state = {"model.embed_tokens.weight": tok_emb, "model.norm.weight": rms_final}
    for i in range(L):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = rms_att[i]
        state[p + "self_attn.q_proj.weight"] = interleaved_to_half_rotary(wq[i], h.n_heads)
        state[p + "self_attn.k_proj.weight"] = interleaved_to_half_rotary(wk[i], h.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = wv[i]
        state[p + "self_attn.o_proj.weight"] = wo[i]
        state[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        state[p + "mlp.gate_proj.weight"] = w1[i]
        state[p + "mlp.down_proj.weight"] = w2[i]
        state[p + "mlp.up_proj.weight"] = w3[i]
    state["lm_head.weight"] = tok_emb if wcls is None else wcls

    model = LlamaForCausalLM(_config(h))
    missing, unexpected = model.load_state_dict(
        {k: v.clone() for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if not (h.shared_classifier and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    if h.shared_classifier:
        model.tie_weights()
    logger.info(
        "loaded llama2.c checkpoint %s: dim %d, %d layers, %d/%d heads, vocab %d, context %d",
        path, d, L, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len,
    )
    return model.eval()


def load_llama2c_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizer:
    """Load the sentencepiece tokenizer stored beside a llama2.c checkpoint."""
    folder = Path(checkpoint).parent
    model_file = folder / TOKENIZER_FILE
    if not model_file.is_file():
        candidates = sorted(folder.glob("*.model"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"no sentencepiece tokenizer for {checkpoint}: expected {model_file} "
                f"(or exactly one *.model file in {folder}, found {len(candidates)})"
            )
        model_file = candidates[0]
    return load_sentencepiece_tokenizer(model_file)
