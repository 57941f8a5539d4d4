"""Apertus: pre-norm blocks with their own norm names (``attention_layernorm``, ``feedforward_layernorm``) and a plain
(ungated) MLP whose activation is xIELU, quadratic for positive inputs: down(xIELU(up(x)))."""

from .base import Adapter, Cut

APERTUS = Adapter(
    family="Apertus",
    model_types=("apertus",),
    layers="layers",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("feedforward_layernorm", "in"),
        "mlp_in": ("mlp", "in"),
        "mlp_up": ("mlp.up_proj", "out"),
        "mlp_act": ("mlp.down_proj", "in"),
        "mlp_out": ("mlp", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="self_attn.o_proj",
    mlp_up="mlp.up_proj",
    mlp_down="mlp.down_proj",
    act_fn="mlp.act_fn",
    mlp_norm=("feedforward_layernorm",),
    values=Cut("self_attn.v_proj"),
    notes="ungated MLP with the xIELU activation (quadratic above zero)",
)
