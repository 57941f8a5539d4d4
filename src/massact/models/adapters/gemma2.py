"""Gemma-2 and Gemma-3 (text): sandwich norms. Each branch is normed again before it lands in the residual:
``post_attention_layernorm`` on the attention output, ``post_feedforward_layernorm`` on the MLP output, and
``pre_feedforward_layernorm`` is the MLP's input norm. attn_out and mlp_out are what lands; *_raw is before."""

from .base import Adapter
from .llama import ADAPTER as LLAMA

ADAPTER = Adapter(
    family="Gemma-2/3",
    model_types=("gemma2", "gemma3_text"),
    layers="layers",
    sites={
        **LLAMA.sites,
        "attn_raw": ("self_attn", "out"),
        "attn_out": ("post_attention_layernorm", "out"),
        "resid_mid": ("pre_feedforward_layernorm", "in"),
        "mlp_raw": ("mlp", "out"),
        "mlp_out": ("post_feedforward_layernorm", "out"),
    },
    attn_proj="self_attn.o_proj",
    mlp_up="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_down="mlp.down_proj",
    act_fn="mlp.act_fn",
    mlp_norm=("pre_feedforward_layernorm",),
    branch_norms={"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    notes="sandwich norms: each branch is normed (post_attention_layernorm, post_feedforward_layernorm) before it lands",
)
