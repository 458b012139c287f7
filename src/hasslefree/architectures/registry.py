"""Where each model family keeps its decoder blocks, and which linear layers share an input.

An entry is a few declarative lines: the dotted path of the block list and the ordered
groups of layer names (relative to a block) that read the same activation, so the
pipeline builds one Hessian per group. Clones of an architecture inherit in one line.
Models whose ``config.model_type`` is not listed fall back to :mod:`.discover`
(:func:`hasslefree.architectures.resolve_architecture` picks).
"""

from __future__ import annotations

from hasslefree.architectures.architecture import Architecture

LLAMA = Architecture(
    "llama", "model.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    ("llama",),
)
PHI3 = Architecture(
    "phi3", "model.layers",
    (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)
OPT = Architecture(
    "opt", "model.decoder.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
     ("fc1",), ("fc2",)),
)
GPT2 = Architecture(
    "gpt2", "transformer.h",
    (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    LLAMA,
    LLAMA.clone("mistral"),
    LLAMA.clone("qwen2"),
    LLAMA.clone("qwen3"),
    LLAMA.clone("gemma"),
    LLAMA.clone("gemma2"),
    LLAMA.clone("gemma3", "gemma3_text"),
    PHI3.clone("phi3"),
    OPT.clone("opt"),
    GPT2.clone("gpt2"),
)
"""Every known family; SmolLM2 is a Llama (model_type "llama")."""

BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}


def lookup(model_type: str | None) -> Architecture | None:
    """The registry entry for a ``config.model_type``, or None."""
    return BY_MODEL_TYPE.get(model_type or "")
