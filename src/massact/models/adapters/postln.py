"""OPT (fc1/fc2 sit on the layer, no MLP module; OPT-350m is post-LN) and the post-LN encoders BERT and RoBERTa.

In a post-LN block the residual sum is normed at the end of the block: the massive value can exist only in that
sum (``resid_sum``, the last LayerNorm's input) and never show in the block output. These adapters detect there.
"""

import dataclasses

from .base import Adapter, Cut, Mlp

OPT_PRE_LN = Adapter(
    family="OPT",
    model_types=("opt",),
    layers="decoder.layers",
    attention_out="out_proj",
    mlp=Mlp(path="", up="fc1", gate=None, down="fc2", act="activation_fn"),
    flat_rows=True,  # the layer flattens the batch before fc1: fc1 and fc2 see [batch x positions, width]
    mlp_norm=("final_layer_norm",),
    values=Cut("self_attn.v_proj"),
    when=lambda config: config.do_layer_norm_before,
    notes="the MLP's fc1 and fc2 sit on the layer; there is no MLP module",
)

OPT_POST_LN = dataclasses.replace(
    OPT_PRE_LN,
    mlp_norm=(),
    post_norms=("self_attn_layer_norm", "final_layer_norm"),
    when=lambda config: not config.do_layer_norm_before,
    notes="post-LN blocks: detected in the residual sum before each block's final LayerNorm",
)

BERT = Adapter(
    family="BERT",
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    # The attention's output module is its projection, its dropout and the norm of the sum: attn_out is the projection's.
    attention="attention.output.dense",
    attention_out="",
    mlp=Mlp(path="", up="intermediate.dense", gate=None, down="output.dense", act="intermediate.intermediate_act_fn"),
    post_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    encoder=True,
    values=Cut("attention.self.value"),
    # RoBERTa's position ids start after its padding index: that many positions fewer for a text.
    position_offset=lambda config: config.pad_token_id + 1 if config.model_type == "roberta" else 0,
    notes="post-LN encoder: detected in the residual sum before each block's output LayerNorm",
)
