"""Hybrids whose token mixer changes along the depth (``config.layer_types``): LFM2 (short gated convolutions and
softmax attention; LFM3 adds sandwich norms and a scalar output gate per head), Qwen3-Next / Qwen3.5 (Gated DeltaNet
linear attention and gated softmax attention) and OLMo-hybrid (Gated DeltaNet blocks with pre-norms, softmax blocks
with OLMo-2's reordered norms). A convolution or a linear attention writes the stream as attention does, through its
output projection: the origin and the lifeline hold as they are; only softmax blocks have attention probabilities
(and sink metrics).

Qwen3-Next and Qwen3.5 gate every softmax head's output: out = o_proj(attention x sigmoid(gate)), the gate computed by
``q_proj`` beside the query (per head, [query | gate]), which Qiu et al. 2025 report removes massive activations and
sinks. Their norms scale by (1 + weight); the norm module's own output is what massact reads, whatever its
convention.
"""

import dataclasses

import torch.nn.functional as F

from . import llama, olmo
from .base import Cut, Mlp, Variant, layer_types

LFM2 = dataclasses.replace(
    llama.ADAPTER,
    family="LFM2",
    model_types=("lfm2",),
    attention_out="out_proj",
    mlp=Mlp(path="feed_forward", up="w3", gate="w1", down="w2", act=F.silu),  # the MLP calls silu: w2(silu(w1 x) x w3 x)
    mlp_norm=("ffn_norm",),
    queries=("self_attn.q_layernorm", "self_attn.q_proj"),
    keys=("self_attn.k_layernorm", "self_attn.k_proj"),
    variants=(Variant(when=lambda config, layer: layer_types(config, layer) == "conv",
                      changes={"mixer": "conv", "attention": "conv", "values": None}),),
    notes="hybrid: short gated convolutions (conv) in most blocks, softmax attention (self_attn) in the others",
)



def _head_gate(g_proj, config):
    """LFM3's output gate pre-activations [batch, positions, heads, 1]: ``g_proj`` gives one scalar per head."""
    return g_proj.unsqueeze(-1)


# LFM3: LFM2's block with attention's o_proj, an output gate per head (out = o_proj(attention x sigmoid(g_proj x)))
# where ``use_attention_gate``, and sandwich norms where ``use_sandwich_norm`` (post_operator_norm, post_ffn_norm norm
# each branch before it lands; without them the modules are identities and nothing is declared).
LFM3 = dataclasses.replace(
    LFM2,
    family="LFM3",
    model_types=("lfm3",),
    attention_out="o_proj",
    gate=Cut("self_attn.g_proj", _head_gate),
    variants=(Variant(when=lambda config, layer: not config.use_attention_gate, changes={"gate": None}),
              Variant(when=lambda config, layer: config.use_sandwich_norm,
                      changes={"branch_norms": {"attn_out": "post_operator_norm", "mlp_out": "post_ffn_norm"}}),
              Variant(when=lambda config, layer: layer_types(config, layer) == "conv",
                      changes={"mixer": "conv", "attention": "conv", "attention_out": "out_proj", "values": None, "gate": None})),
    notes="hybrid: short gated convolutions (conv) in most blocks, softmax attention (self_attn) in the others, its output "
          "x sigmoid(g_proj) per head where use_attention_gate; sandwich norms (post_operator_norm, post_ffn_norm) where "
          "use_sandwich_norm",
)

def _gate(q_proj, config):
    """The output gate's pre-activations [batch, positions, heads, head_dim]: ``q_proj`` gives per head [query | gate]."""
    return q_proj.view(*q_proj.shape[:2], config.num_attention_heads, -1)[..., config.head_dim:]


QWEN3_NEXT = dataclasses.replace(
    llama.ADAPTER,
    family="Qwen3-Next/3.5",
    model_types=("qwen3_next", "qwen3_5_text"),
    gate=Cut("self_attn.q_proj", _gate),
    variants=(Variant(when=lambda config, layer: layer_types(config, layer) == "linear_attention",
                      changes={"mixer": "linear", "attention": "linear_attn", "attention_out": "out_proj", "values": None,
                               "gate": None}),),
    when=lambda config: not getattr(config, "num_experts", 0),  # with experts: models/adapters/moe.py
    notes="hybrid: Gated DeltaNet linear attention (linear_attn) in most blocks, gated softmax attention (self_attn: "
          "output x sigmoid(gate) per head) in the others",
)

# Qwen3.5's multimodal class: the same language model under ``language_model`` (AutoModelForCausalLM loads the text
# model alone, model type qwen3_5_text).
QWEN3_5_MULTIMODAL = dataclasses.replace(QWEN3_NEXT, model_types=("qwen3_5",), layers="language_model.layers")

# OLMo-hybrid: its softmax blocks are OLMo-2's (no norm before a sublayer, each branch normed before it lands); its
# Gated DeltaNet blocks are pre-norm (input_layernorm before the mixer, post_attention_layernorm before the MLP).
OLMO_HYBRID = dataclasses.replace(
    olmo.OLMO2,
    family="OLMo-hybrid",
    model_types=("olmo_hybrid",),
    variants=(Variant(when=lambda config, layer: layer_types(config, layer) == "linear_attention",
                      changes={"mixer": "linear", "attention": "linear_attn", "values": None, "branch_norms": {},
                               "mlp_norm": ("post_attention_layernorm",)}),),
    notes="hybrid: Gated DeltaNet linear attention (linear_attn) in pre-norm blocks, softmax attention (self_attn) in blocks "
          "with reordered norms (each branch normed before it lands: post_attention_layernorm, post_feedforward_layernorm)",
)
