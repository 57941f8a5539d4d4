"""State-space hybrids: Nemotron-H, Jamba, Bamba and Granite-4.0-H, whose token mixer is a Mamba (or Mamba-2) selective
scan in most blocks and softmax attention in the others, and Falcon-H1, which runs both side by side in every block. The
scan writes the stream through its ``out_proj`` as a convolution does: the origin, the lifeline and the trigger's sources
hold as they are; it has no attention probabilities, so only the softmax blocks have sink metrics.

Jamba and Bamba keep the two-sublayer block (mixer, then MLP: ``input_layernorm``, ``pre_ff_layernorm``); Jamba's
MLP is a mixture of experts every ``expert_layer_period`` blocks. A Nemotron-H block is one sublayer, a Mamba-2 scan,
an attention, an ungated MLP or a mixture of experts (``mixer`` in each), behind one norm and added once to the
residual: a scan or attention block has no MLP (``no_mlp``), an MLP or expert block no token mixer (``mixer`` None).
Its experts are ungated (``up_proj``, ``down_proj``: act_fn(up), ReLU^2), routed as DeepSeek-V3's (sigmoid, a
correction bias, group-limited top-k, renormalised, scaled), beside an ungated shared expert. Granite-4.0-H is
Bamba's block with Granite's scales (``branch_scale``, ``embedding_scale``) and its MLP in ``shared_mlp``; with experts
(``num_local_experts`` > 0, the config's default) the MLP's output is the routed experts' (``block_sparse_moe``) plus the
shared MLP's, two sibling modules whose sum no module returns (``Moe.shared_beside``: mlp_out is ``Summed``).

A Falcon-H1 block runs a Mamba-2 scan and softmax attention on the same normed input and adds both outputs, each times
its muP multiplier, as one branch: attn_out is the ``Summed`` output of the two (``mixer_parts``), and the attention
(its probabilities, heads and values) is the ``self_attn`` part. Its gated MLP multiplies the gate pre-activation and
the down projection's output by the config's ``mlp_multipliers`` (``Mlp.gate_scale``, ``down_scale``); the token
embeddings are multiplied by ``embedding_multiplier``. ``key_multiplier``, ``attention_in_multiplier`` and the scan's
own multipliers act inside the mixers, ``lm_head_multiplier`` on the logits: no site reads between them.
"""

import dataclasses

from . import llama
from .base import Adapter, Cut, Experts, Mlp, Moe, Part, Router, Variant
from .moe import _SIGMOID  # DeepSeek-V3's routing


def _block_type(config, layer: int) -> str:
    """Nemotron-H's and Jamba's block kind (``layers_block_type``): mamba / linear_attention, attention / full_attention,
    mlp, moe."""
    return str(config.layers_block_type[layer])


_NEMOTRON_NOTE = ("one sublayer per block (a Mamba-2 scan, an attention, an ungated ReLU^2 MLP or a mixture of experts, "
                  "each at `mixer`) behind one norm: scan and attention blocks have no MLP, MLP and expert blocks no token "
                  "mixer; ungated experts, DeepSeek-V3's sigmoid routing with a correction bias, an ungated shared expert "
                  "added as it is; latent experts (moe_latent_size) read fc1_latent_proj(x) and land through "
                  "fc2_latent_proj: an expert super weight is then [expert, latent unit, neuron] of the experts' down_proj, "
                  "the entry on the neuron's largest path through the latent into the dim")

_ALONE = {"attention": "mixer", "mlp": None, "no_mlp": True}  # a token mixer at ``mixer``, with no MLP after it
_NEMOTRON_MOE = Moe(router=_SIGMOID, experts=Experts(gated=False), block="mixer", shared=Mlp(path="shared_experts", gate=None))

NEMOTRON_H = Adapter(
    family="Nemotron-H",
    model_types=("nemotron_h",),
    layers="layers",
    mixer=None,  # an MLP block: up_proj -> act_fn (ReLU^2) -> down_proj at ``mixer``, ungated, with no token mixer
    mlp=Mlp(path="mixer", gate=None),
    mlp_norm=("norm",),
    variants=(
        Variant(when=lambda config, layer: _block_type(config, layer) == "linear_attention",
                changes=_ALONE | {"mixer": "ssm", "attention_out": "out_proj"}),
        Variant(when=lambda config, layer: _block_type(config, layer) == "full_attention",
                changes=_ALONE | {"mixer": "attention", "values": Cut("mixer.v_proj")}),
        Variant(when=lambda config, layer: _block_type(config, layer) == "moe", changes={"mlp": None, "moe": _NEMOTRON_MOE}),
        # Latent experts (``moe_latent_size``): the experts read fc1_latent_proj(x), their weighted sum lands through
        # fc2_latent_proj (identities without it). ``mlp_bias`` gives these, the shared expert and the dense MLPs
        # biases, which the recomputations read from the modules.
        Variant(when=lambda config, layer: _block_type(config, layer) == "moe" and config.moe_latent_size is not None,
                changes={"mlp": None,
                         "moe": dataclasses.replace(_NEMOTRON_MOE, latent=("fc1_latent_proj", "fc2_latent_proj"))}),
    ),
    notes=_NEMOTRON_NOTE,
)

_MAMBA = {"mixer": "ssm", "attention": "mamba", "attention_out": "out_proj", "values": None}
_SSM_NOTE = "hybrid: Mamba state-space scans (mamba, out_proj) in most blocks, softmax attention (self_attn) in the others"

BAMBA = dataclasses.replace(
    llama.ADAPTER,
    family="Bamba",
    model_types=("bamba",),
    mlp=Mlp(path="feed_forward"),
    mlp_norm=("pre_ff_layernorm",),
    variants=(Variant(when=lambda config, layer: _block_type(config, layer) == "linear_attention", changes=_MAMBA),),
    notes=_SSM_NOTE.replace("Mamba", "Mamba-2"),
)

JAMBA = dataclasses.replace(
    BAMBA,
    family="Jamba",
    model_types=("jamba",),
    mlp=None,
    # Softmax over every expert, the top-k weights left as they are.
    moe=Moe(router=Router(path="router"), experts=Experts(), block="feed_forward"),
    variants=(Variant(when=lambda config, layer: _block_type(config, layer) == "mamba", changes=_MAMBA),
              Variant(when=lambda config, layer: config.layers_num_experts[layer] == 1,
                      changes={"moe": None, "mlp": Mlp(path="feed_forward")})),
    notes=_SSM_NOTE + "; a mixture-of-experts MLP every expert_layer_period blocks (softmax, top-k, not renormalised), dense "
                      "MLPs between",
)

_GRANITE_H_NOTE = ("hybrid: Mamba-2 scans (mamba, out_proj) in most blocks, softmax attention (self_attn) in the others, then "
                   "a dense gated MLP (shared_mlp: gate and up fused in input_linear); each branch is multiplied by the "
                   "config's residual_multiplier before it lands (attn_out, mlp_out: what lands; attn_raw, mlp_raw: the "
                   "sublayers' own outputs), the token embeddings by its embedding_multiplier")

# Granite-4.0-H: Granite's scales on Bamba's block, its MLP the shared MLP alone where the config has no experts.
GRANITE_4_H = Adapter(
    family="Granite-4.0-H",
    model_types=("granitemoehybrid",),
    layers="layers",
    mlp=Mlp(path="shared_mlp", up="input_linear", gate=None, down="output_linear", act="activation", fused=True),
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.v_proj"),
    branch_scale="residual_multiplier",
    embedding_scale="embedding_multiplier",
    variants=(
        Variant(when=lambda config, layer: _block_type(config, layer) == "linear_attention", changes=_MAMBA),
        # The attention sees positions only where the config gives it rotary embeddings (Granite-4.0-H's are "nope").
        Variant(when=lambda config, layer: _block_type(config, layer) != "linear_attention" and config.position_embedding_type != "rope",
                changes={"positions": False}),
    ),
    when=lambda config: not config.num_local_experts,
    notes=_GRANITE_H_NOTE,
)

# With experts, every block adds the routed experts' output (block_sparse_moe: a top-k of the router's logits, then a
# softmax over those k, the same as a softmax over every expert renormalised over the k) to the shared MLP's, which
# sits beside the mixture of experts in the decoder layer.
GRANITE_4_H_MOE = dataclasses.replace(
    GRANITE_4_H,
    mlp=None,
    moe=Moe(router=Router(path="router", renormalise=True), experts=Experts(), block="block_sparse_moe",
            shared=GRANITE_4_H.mlp, shared_beside=True),
    when=lambda config: bool(config.num_local_experts),
    notes=_GRANITE_H_NOTE.replace("then a dense gated MLP (shared_mlp: gate and up fused in input_linear)",
                                  "then a mixture of experts (block_sparse_moe: softmax over the top-k logits) plus, beside it, "
                                  "a dense gated shared MLP (shared_mlp: gate and up fused in input_linear) on the same input; "
                                  "mlp_out is their sum"),
)

FALCON_H1 = Adapter(
    family="Falcon-H1",
    model_types=("falcon_h1",),
    layers="layers",
    mixer="attention",
    # The scan, then the attention (on its input times attention_in_multiplier), each output times its multiplier.
    mixer_parts=(Part(path="mamba", factor="ssm_out_multiplier", projection="out_proj"),
                 Part(path="self_attn", factor="attention_out_multiplier", projection="o_proj")),
    values=Cut("self_attn.v_proj"),
    # down_proj(up x act(gate x gate_multiplier)) x down_multiplier
    mlp=Mlp(path="feed_forward", gate_scale=("mlp_multipliers", 0), down_scale=("mlp_multipliers", 1)),
    mlp_norm=("pre_ff_layernorm",),
    embedding_scale="embedding_multiplier",
    notes="parallel mixers: every block runs a Mamba-2 scan (mamba, out_proj) and softmax attention (self_attn) on the same "
          "normed input, and attn_out is their sum, each times its multiplier (ssm_out_multiplier, attention_out_multiplier): "
          "the heads split the attention's part; a gated MLP with muP multipliers (act(gate x mlp_multipliers[0]), the down "
          "projection's output x mlp_multipliers[1]: mlp_raw, then mlp_out); the token embeddings x embedding_multiplier",
)
