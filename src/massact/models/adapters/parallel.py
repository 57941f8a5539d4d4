"""GPT-NeoX / Pythia, GPT-J and Falcon: LayerNorm blocks whose attention and MLP may both read the block input
(parallel residual: resid_out = resid_in + attn_out + mlp_out, no resid_mid). Which variant a checkpoint uses is in
its config, so each family has a parallel and a sequential adapter."""

from .base import Adapter, Cut

_NEOX_MLP = {
    "mlp_in": ("mlp", "in"),
    "mlp_up": ("mlp.dense_h_to_4h", "out"),
    "mlp_act": ("mlp.dense_4h_to_h", "in"),
    "mlp_out": ("mlp", "out"),
}
_NEOX = dict(model_types=("gpt_neox",), layers="layers", attn_proj="attention.dense", mlp_up="mlp.dense_h_to_4h",
             mlp_down="mlp.dense_4h_to_h", act_fn="mlp.act", mlp_norm=("post_attention_layernorm",))

NEOX_PARALLEL = Adapter(
    family="GPT-NeoX",
    sites={"resid_in": ("", "in"), "attn_out": ("attention", "out"), **_NEOX_MLP, "resid_out": ("", "out")},
    when=lambda config: getattr(config, "use_parallel_residual", True),
    notes="parallel residual: attention and MLP both read the block input (each through its own LayerNorm)",
    **_NEOX,
)

NEOX_SEQUENTIAL = Adapter(
    family="GPT-NeoX",
    sites={"resid_in": ("", "in"), "attn_out": ("attention", "out"), "resid_mid": ("post_attention_layernorm", "in"),
           **_NEOX_MLP, "resid_out": ("", "out")},
    **_NEOX,
)

GPTJ = Adapter(
    family="GPT-J",
    model_types=("gptj",),
    layers="h",
    sites={
        "resid_in": ("", "in"),
        "attn_out": ("attn", "out"),
        "mlp_in": ("mlp", "in"),
        "mlp_up": ("mlp.fc_in", "out"),
        "mlp_act": ("mlp.fc_out", "in"),
        "mlp_out": ("mlp", "out"),
        "resid_out": ("", "out"),
    },
    attn_proj="attn.out_proj",
    mlp_up="mlp.fc_in",
    mlp_down="mlp.fc_out",
    act_fn="mlp.act",
    mlp_norm=("ln_1",),
    values=Cut("attn.v_proj"),
    notes="parallel block: attention and MLP read the same normed input (one shared ln_1)",
)

_FALCON_MLP = {
    "mlp_in": ("mlp", "in"),
    "mlp_up": ("mlp.dense_h_to_4h", "out"),
    "mlp_act": ("mlp.dense_4h_to_h", "in"),
    # Falcon adds the attention output into the MLP's output tensor in place: read the down projection instead.
    "mlp_out": ("mlp.dense_4h_to_h", "out"),
}
_FALCON = dict(model_types=("falcon",), layers="h", attn_proj="self_attention.dense", mlp_up="mlp.dense_h_to_4h",
               mlp_down="mlp.dense_4h_to_h", act_fn="mlp.act")
# The new decoder architecture may give the MLP its own ln_mlp; otherwise it shares input_layernorm with attention.

FALCON_PARALLEL = Adapter(
    family="Falcon",
    sites={"resid_in": ("", "in"), "attn_out": ("self_attention", "out"), **_FALCON_MLP, "resid_out": ("", "out")},
    when=lambda config: config.parallel_attn or config.new_decoder_architecture,
    notes="parallel block: attention and MLP both read the block input",
    mlp_norm=("ln_mlp", "input_layernorm"),
    **_FALCON,
)

FALCON_SEQUENTIAL = Adapter(
    family="Falcon",
    sites={"resid_in": ("", "in"), "attn_out": ("self_attention", "out"), "resid_mid": ("post_attention_layernorm", "in"),
           **_FALCON_MLP, "resid_out": ("", "out")},
    mlp_norm=("post_attention_layernorm",),
    **_FALCON,
)
