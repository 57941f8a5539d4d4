"""OPT (fc1/fc2 sit on the layer, no MLP module; OPT-350m is post-LN) and the post-LN encoders BERT and RoBERTa.

In a post-LN block the residual sum is normed at the end of the block: the massive value can exist only in that
sum (``resid_sum``, the last LayerNorm's input) and never show in the block output. These adapters detect there.
"""

from .base import Adapter, Cut

_OPT = dict(model_types=("opt",), layers="decoder.layers", attn_proj="self_attn.out_proj", mlp_up="fc1",
            mlp_down="fc2", act_fn="activation_fn", values=Cut("self_attn.v_proj"))

OPT_PRE_LN = Adapter(
    family="OPT",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("final_layer_norm", "in"),
        "mlp_in": ("fc1", "in"),
        "mlp_up": ("fc1", "out"),
        "mlp_act": ("fc2", "in"),
        "mlp_out": ("fc2", "out"),
        "resid_out": ("", "out"),
    },
    when=lambda config: config.do_layer_norm_before,
    mlp_norm=("final_layer_norm",),
    notes="the MLP's fc1 and fc2 sit on the layer; there is no MLP module",
    **_OPT,
)

OPT_POST_LN = Adapter(
    family="OPT",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("self_attn", "out"),
        "attn_sum": ("self_attn_layer_norm", "in"),
        "resid_mid": ("self_attn_layer_norm", "out"),
        "mlp_in": ("fc1", "in"),
        "mlp_up": ("fc1", "out"),
        "mlp_act": ("fc2", "in"),
        "mlp_out": ("fc2", "out"),
        "resid_sum": ("final_layer_norm", "in"),
        "resid_out": ("", "out"),
    },
    stream="resid_sum",
    notes="post-LN blocks: detected in the residual sum before each block's final LayerNorm",
    **_OPT,
)

BERT = Adapter(
    family="BERT",
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("attention.output.dense", "out"),
        "attn_sum": ("attention.output.LayerNorm", "in"),
        "resid_mid": ("attention.output", "out"),
        "mlp_in": ("intermediate", "in"),
        "mlp_up": ("intermediate.dense", "out"),
        "mlp_act": ("output.dense", "in"),
        "mlp_out": ("output.dense", "out"),
        "resid_sum": ("output.LayerNorm", "in"),
        "resid_out": ("", "out"),
    },
    attn_proj="attention.output.dense",
    mlp_up="intermediate.dense",
    mlp_down="output.dense",
    act_fn="intermediate.intermediate_act_fn",
    stream="resid_sum",
    encoder=True,
    values=Cut("attention.self.value"),
    # RoBERTa's position ids start after its padding index: that many positions fewer for a text.
    position_offset=lambda config: config.pad_token_id + 1 if config.model_type == "roberta" else 0,
    notes="post-LN encoder: detected in the residual sum before each block's output LayerNorm",
)
