"""Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1, Seed-OSS, SmolLM3): pre-RMSNorm blocks, gated MLP.

Gemma 1 has the same block; its embedding module multiplies by sqrt(d_model), which the block input already holds,
and its RMSNorm gain is (1 + weight). SmolLM3 leaves the rotary embedding out of every fourth block
(``no_rope_layers``: 1 uses it, 0 does not).
"""

import dataclasses

from .base import Adapter, Cut, Variant

ADAPTER = Adapter(
    family="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "seed_oss"),
    layers="layers",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("post_attention_layernorm", "in"),
        "mlp_in": ("mlp", "in"),
        "mlp_gate": ("mlp.gate_proj", "out"),
        "mlp_up": ("mlp.up_proj", "out"),
        "mlp_act": ("mlp.down_proj", "in"),
        "mlp_out": ("mlp", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="self_attn.o_proj",
    mlp_up="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_down="mlp.down_proj",
    act_fn="mlp.act_fn",
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.v_proj"),
)

SMOLLM3 = dataclasses.replace(
    ADAPTER,
    model_types=("smollm3",),
    variants=(Variant(lambda config, layer: not config.no_rope_layers[layer], {"positions": False}),),
    notes="blocks without rotary positions (NoPE) every fourth block",
)
