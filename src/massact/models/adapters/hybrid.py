"""Hybrids whose token mixer changes along the depth (``config.layer_types``): LFM2 (short gated convolutions and
softmax attention) and Qwen3-Next / Qwen3.5 (Gated DeltaNet linear attention and gated softmax attention). A
convolution or a linear attention writes the stream as attention does, through its output projection: the origin
and the lifeline hold as they are; only softmax blocks have attention probabilities (and sink metrics).

Qwen3-Next and Qwen3.5 gate every softmax head's output: out = o_proj(attention x sigmoid(gate)), the gate computed by
``q_proj`` beside the query (per head, [query | gate]), which Qiu et al. 2025 report removes massive activations and
sinks. Their norms scale by (1 + weight); the norm module's own output is what massact reads, whatever its
convention.
"""

import dataclasses

import torch.nn.functional as F

from .base import Adapter, Cut, Variant, layer_types

LFM2 = Adapter(
    family="LFM2",
    model_types=("lfm2",),
    layers="layers",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("ffn_norm", "in"),
        "mlp_in": ("feed_forward", "in"),
        "mlp_gate": ("feed_forward.w1", "out"),
        "mlp_up": ("feed_forward.w3", "out"),
        "mlp_act": ("feed_forward.w2", "in"),
        "mlp_out": ("feed_forward", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="self_attn.out_proj",
    mlp_up="feed_forward.w3",
    mlp_gate="feed_forward.w1",
    mlp_down="feed_forward.w2",
    act_fn=F.silu,  # the MLP calls silu as a function: w2(silu(w1 x) x w3 x)
    mlp_norm=("ffn_norm",),
    values=Cut("self_attn.v_proj"),
    variants=(Variant(lambda config, layer: layer_types(config, layer) == "conv",
                      {"mixer": "conv", "sites": {"attn_out": ("conv", "out")}, "attn_proj": "conv.out_proj", "values": None}),),
    notes="hybrid: short gated convolutions (conv) in most blocks, softmax attention (self_attn) in the others",
)


def _gate(q_proj, config):
    """The output gate's pre-activations [batch, positions, heads, head_dim]: ``q_proj`` gives per head [query | gate]."""
    return q_proj.view(*q_proj.shape[:2], config.num_attention_heads, -1)[..., config.head_dim:]


QWEN3_NEXT = Adapter(
    family="Qwen3-Next/3.5",
    model_types=("qwen3_next", "qwen3_5_text"),
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
    gate=Cut("self_attn.q_proj", _gate),
    variants=(Variant(lambda config, layer: layer_types(config, layer) == "linear_attention",
                      {"mixer": "linear", "sites": {"attn_out": ("linear_attn", "out")}, "attn_proj": "linear_attn.out_proj",
                       "values": None, "gate": None}),),
    when=lambda config: not getattr(config, "num_experts", 0),  # with experts: models/adapters/moe.py
    notes="hybrid: Gated DeltaNet linear attention (linear_attn) in most blocks, gated softmax attention (self_attn: "
          "output x sigmoid(gate) per head) in the others",
)

# Qwen3.5's multimodal class: the same language model under ``language_model`` (AutoModelForCausalLM loads the text
# model alone, model type qwen3_5_text).
QWEN3_5_MULTIMODAL = dataclasses.replace(QWEN3_NEXT, model_types=("qwen3_5",), layers="language_model.layers")
