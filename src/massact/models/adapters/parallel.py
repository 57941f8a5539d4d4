"""GPT-NeoX / Pythia, GPT-J and Falcon: LayerNorm blocks whose attention and MLP may both read the block input
(parallel residual: resid_out = resid_in + attn_out + mlp_out, no resid_mid). Which variant a checkpoint uses is in
its config, so each family has a parallel and a sequential adapter."""

import dataclasses

from .base import Adapter, Cut, Mlp

_H_TO_4H = Mlp(up="dense_h_to_4h", gate=None, down="dense_4h_to_h", act="act")


def _neox_parallel(config) -> bool:
    return getattr(config, "use_parallel_residual", True)


NEOX_PARALLEL = Adapter(
    family="GPT-NeoX",
    model_types=("gpt_neox",),
    layers="layers",
    attention="attention",
    attention_out="dense",
    mlp=_H_TO_4H,
    mlp_norm=("post_attention_layernorm",),
    parallel=True,
    when=_neox_parallel,
    notes="parallel residual: attention and MLP both read the block input (each through its own LayerNorm)",
)

NEOX_SEQUENTIAL = dataclasses.replace(NEOX_PARALLEL, parallel=False, when=lambda config: not _neox_parallel(config), notes="")

GPTJ = Adapter(
    family="GPT-J",
    model_types=("gptj",),
    layers="h",
    attention="attn",
    attention_out="out_proj",
    mlp=Mlp(up="fc_in", gate=None, down="fc_out", act="act"),
    mlp_norm=("ln_1",),
    parallel=True,
    values=Cut("attn.v_proj"),
    notes="parallel block: attention and MLP read the same normed input (one shared ln_1)",
)


def _falcon_parallel(config) -> bool:
    return config.parallel_attn or config.new_decoder_architecture


FALCON_PARALLEL = Adapter(
    family="Falcon",
    model_types=("falcon",),
    layers="h",
    attention="self_attention",
    attention_out="dense",
    # Falcon adds the attention output into the MLP's output tensor in place: mlp_out is read at the down projection.
    mlp=dataclasses.replace(_H_TO_4H, out_at_down=True),
    # The new decoder architecture may give the MLP its own ln_mlp; otherwise it shares input_layernorm with attention.
    mlp_norm=("ln_mlp", "input_layernorm"),
    parallel=True,
    when=_falcon_parallel,
    notes="parallel block: attention and MLP both read the block input",
)

FALCON_SEQUENTIAL = dataclasses.replace(FALCON_PARALLEL, parallel=False, mlp_norm=("post_attention_layernorm",),
                                        when=lambda config: not _falcon_parallel(config), notes="")
