"""Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1): pre-RMSNorm blocks, gated MLP.

Gemma 1 has the same block; its embedding module multiplies by sqrt(d_model), which the block input already holds,
and its RMSNorm gain is (1 + weight).
"""

from .base import Adapter

ADAPTER = Adapter(
    family="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
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
)
