"""Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1, Seed-OSS, SmolLM3): pre-RMSNorm blocks, gated MLP.

Gemma 1 has the same block; its embedding module multiplies by sqrt(d_model), which the block input already holds,
and its RMSNorm gain is (1 + weight). SmolLM3 leaves the rotary embedding out of every fourth block
(``no_rope_layers``: 1 uses it, 0 does not).

``ADAPTER`` is the base most decoder families share: ``self_attn`` with ``o_proj`` and ``v_proj``, an ``mlp`` with
``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``, and ``post_attention_layernorm`` in front of the MLP; the
others are it with their differences (``dataclasses.replace``).
"""

import dataclasses

from .base import Adapter, Cut, Mlp, Variant

ADAPTER = Adapter(
    family="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "seed_oss"),
    layers="layers",
    mlp=Mlp(),
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.v_proj"),
)

SMOLLM3 = dataclasses.replace(
    ADAPTER,
    model_types=("smollm3",),
    variants=(Variant(when=lambda config, layer: not config.no_rope_layers[layer], changes={"positions": False}),),
    notes="blocks without rotary positions (NoPE) every fourth block",
)
