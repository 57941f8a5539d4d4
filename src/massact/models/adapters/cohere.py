"""Cohere-2 (Command R7B, Command A): a parallel block with one shared LayerNorm, as GPT-J:
resid_out = resid_in + attn(ln(resid_in)) + mlp(ln(resid_in)). Sliding-window blocks use rotary positions; the
full-attention blocks (one in four) use none (NoPE)."""

from .base import Adapter, Cut, Variant, layer_types

COHERE2 = Adapter(
    family="Cohere-2",
    model_types=("cohere2",),
    layers="layers",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
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
    mlp_norm=("input_layernorm",),
    values=Cut("self_attn.v_proj"),
    # Only a sliding-window block applies the rotary embedding.
    variants=(Variant(lambda config, layer: not (config.sliding_window is not None
                                                 and layer_types(config, layer) == "sliding_attention"), {"positions": False}),),
    notes="parallel block: attention and MLP read the same normed input (one shared input_layernorm); full-attention "
          "blocks use no rotary positions",
)
