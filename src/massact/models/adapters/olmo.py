"""OLMo-2, OLMo-3 and EXAONE-4: reordered norms. No norm in front of either sublayer; each branch's output is normed
before it lands (``post_attention_layernorm`` on the attention, ``post_feedforward_layernorm`` on the MLP):

    resid_mid = resid_in + norm_a(attn(resid_in)),   resid_out = resid_mid + norm_m(mlp(resid_mid))

A normed branch is about as large as its gain: a massive value needs a large gain on its dim, and the branch norm's
factors (``branch_norms``, as for Gemma's sandwich norms) name it. OLMo-3 alternates sliding and full attention;
EXAONE-4 does too, and its full-attention blocks use no rotary positions where it has a sliding window (NoPE).

OLMo (the first, ``olmo``) has Llama's pre-norm block, its norms LayerNorms without a gain or a bias: a norm in front
of a sublayer cannot amplify one dim. ``clip_qkv`` clamps the queries, keys and values where the config sets it.
"""

import dataclasses

from . import llama
from .base import Variant, layer_types

OLMO2 = dataclasses.replace(
    llama.ADAPTER,
    family="OLMo-2/3",
    model_types=("olmo2", "olmo3"),
    mlp_norm=(),  # the MLP reads the stream itself: resid_mid is its input
    branch_norms={"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    notes="reordered norms: no norm before a sublayer; each branch is normed (post_attention_layernorm, "
          "post_feedforward_layernorm) before it lands",
)

EXAONE4 = dataclasses.replace(
    OLMO2,
    family="EXAONE-4",
    model_types=("exaone4",),
    # With a sliding window, the full-attention blocks skip the rotary embedding ("global NoPE").
    variants=(Variant(when=lambda config, layer: config.sliding_window is not None and layer_types(config, layer) == "full_attention",
                      changes={"positions": False}),),
    notes=OLMO2.notes + "; full-attention blocks use no rotary positions",
)

OLMO = dataclasses.replace(
    llama.ADAPTER,
    family="OLMo",
    model_types=("olmo",),
    notes="LayerNorms without a gain or a bias in front of each sublayer; q, k and v clamped to clip_qkv where it is set",
)
