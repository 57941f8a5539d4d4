"""Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1, Seed-OSS, SmolLM3, Ministral, Ministral-3,
InternLM3): pre-RMSNorm blocks, gated MLP.

Gemma 1 has the same block; its embedding module multiplies by sqrt(d_model), which the block input already holds,
and its RMSNorm gain is (1 + weight). SmolLM3 leaves the rotary embedding out of every fourth block
(``no_rope_layers``: 1 uses it, 0 does not). Ministral alternates sliding-window and full attention by its
``layer_types``; Ministral-3 scales its queries by position (Llama-4's ``llama_4_scaling_beta``, inside the
attention); InternLM3 ships its own config (``internlm3``) and runs transformers' Llama classes.

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
    queries=("self_attn.q_norm", "self_attn.q_proj"),  # Qwen3 and Gemma-3 norm each head's query and key
    keys=("self_attn.k_norm", "self_attn.k_proj"),
)

SMOLLM3 = dataclasses.replace(
    ADAPTER,
    model_types=("smollm3",),
    variants=(Variant(when=lambda config, layer: not config.no_rope_layers[layer], changes={"positions": False}),),
    notes="blocks without rotary positions (NoPE) every fourth block",
)

MINISTRAL = dataclasses.replace(
    ADAPTER,
    family="Ministral",
    model_types=("ministral",),
    notes="sliding-window and full attention by layer_types",
)

MINISTRAL3 = dataclasses.replace(
    ADAPTER,
    family="Ministral-3",
    model_types=("ministral3",),
    notes="queries scaled by position inside the attention (llama_4_scaling_beta)",
)

INTERNLM3 = dataclasses.replace(ADAPTER, family="InternLM3", model_types=("internlm3",))
