"""OLMo-2, OLMo-3 and EXAONE-4: reordered norms. No norm in front of either sublayer; each branch's output is normed
before it lands (``post_attention_layernorm`` on the attention, ``post_feedforward_layernorm`` on the MLP):

    resid_mid = resid_in + norm_a(attn(resid_in)),   resid_out = resid_mid + norm_m(mlp(resid_mid))

A normed branch is about as large as its gain: a massive value needs a large gain on its dim, and the branch norm's
factors (``branch_norms``, as for Gemma's sandwich norms) name it. OLMo-3 alternates sliding and full attention;
EXAONE-4 does too, and its full-attention blocks use no rotary positions where it has a sliding window (NoPE).
"""

from .base import Adapter, Cut, Variant, layer_types

_SITES = {
    "resid_in": ("", "in"),
    "attn_raw": ("self_attn", "out"),
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("mlp", "in"),  # the MLP reads the stream itself
    "mlp_in": ("mlp", "in"),
    "mlp_gate": ("mlp.gate_proj", "out"),
    "mlp_up": ("mlp.up_proj", "out"),
    "mlp_act": ("mlp.down_proj", "in"),
    "mlp_raw": ("mlp", "out"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
    "resid_out": ("", "out"),
}
_COMMON = dict(layers="layers", sites=_SITES, attn_proj="self_attn.o_proj", mlp_up="mlp.up_proj", mlp_gate="mlp.gate_proj",
               mlp_down="mlp.down_proj", act_fn="mlp.act_fn", values=Cut("self_attn.v_proj"),
               branch_norms={"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"})

OLMO2 = Adapter(
    family="OLMo-2/3",
    model_types=("olmo2", "olmo3"),
    notes="reordered norms: no norm before a sublayer; each branch is normed (post_attention_layernorm, "
          "post_feedforward_layernorm) before it lands",
    **_COMMON,
)

EXAONE4 = Adapter(
    family="EXAONE-4",
    model_types=("exaone4",),
    # With a sliding window, the full-attention blocks skip the rotary embedding ("global NoPE").
    variants=(Variant(lambda config, layer: config.sliding_window is not None and layer_types(config, layer) == "full_attention",
                      {"positions": False}),),
    notes="reordered norms: no norm before a sublayer; each branch is normed (post_attention_layernorm, "
          "post_feedforward_layernorm) before it lands; full-attention blocks use no rotary positions",
    **_COMMON,
)
