"""Mixtures of experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V2 and V3, Llama-4, GLM-4.5, and the
expert blocks of Qwen3-Next and Qwen3.5-MoE. transformers 5 fuses each block's experts into 3-D parameters, so no hook
sees a neuron inside an expert: the scan reads the MoE block's input and output, and
``massact.capture.routing`` recomputes the routing (as ``Router`` declares it) and every expert's neurons
from the weights (as ``Experts`` lays them out). Where a family mixes dense blocks in (``first_k_dense_replace``,
``mlp_only_layers`` and ``decoder_sparse_step``, ``moe_layers``), a variant gives those blocks their dense MLP.

DeepSeek's attention is multi-head latent attention (MLA): keys and values come from one latent per token through
``kv_b_proj``, whose rows give each head [key | value]; the value vectors are read there. gpt-oss has a learned sink
logit per head that joins the softmax.
"""

from __future__ import annotations

import dataclasses

from .base import Adapter, Cut, Experts, Moe, Router, Variant
from .hybrid import QWEN3_NEXT
from .llama import ADAPTER as LLAMA


def _dense(block: str = "mlp", activation: str = "act_fn") -> dict:
    """The changes that give a dense block of a mixture-of-experts model its gated MLP at ``block``."""
    return {
        "moe": None,
        "sites": {"mlp_gate": (f"{block}.gate_proj", "out"), "mlp_up": (f"{block}.up_proj", "out"),
                  "mlp_act": (f"{block}.down_proj", "in")},
        "mlp_up": f"{block}.up_proj", "mlp_gate": f"{block}.gate_proj", "mlp_down": f"{block}.down_proj",
        "act_fn": f"{block}.{activation}",
    }


def _sparse_step(config, layer: int) -> bool:
    """Qwen-MoE's rule for a dense block: listed in ``mlp_only_layers``, off the ``decoder_sparse_step``, or no experts."""
    return (layer in getattr(config, "mlp_only_layers", []) or not getattr(config, "num_experts", 0)
            or (layer + 1) % getattr(config, "decoder_sparse_step", 1) != 0)


def _first_k(config, layer: int) -> bool:
    """DeepSeek's and GLM's rule: the first ``first_k_dense_replace`` blocks are dense."""
    return layer < config.first_k_dense_replace


# Sites of a MoE block: its input and output (the neurons inside fused experts are not modules).
_MOE_SITES = {site: LLAMA.sites[site] for site in ("resid_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_out")}
_COMMON = dict(layers="layers", sites=_MOE_SITES, attn_proj="self_attn.o_proj", mlp_up="mlp", mlp_down="mlp", act_fn="mlp",
               mlp_norm=("post_attention_layernorm",), values=Cut("self_attn.v_proj"))
_NOTE = "mixture-of-experts MLP: attributed to the routed experts (router weight x expert output), then to neurons inside them"
_SOFTMAX = Router(renormalise="norm_topk_prob")  # softmax over every expert, top-k, renormalised where the config says

MIXTRAL = Adapter(family="Mixtral", model_types=("mixtral",), moe=Moe(router=Router(renormalise=True)), notes=_NOTE, **_COMMON)

QWEN2_MOE = Adapter(
    family="Qwen2-MoE",
    model_types=("qwen2_moe",),
    moe=Moe(router=_SOFTMAX, shared="shared_expert", shared_gate="shared_expert_gate"),
    variants=(Variant(_sparse_step, _dense()),),
    notes=_NOTE + ", plus a shared expert scaled by sigmoid(shared_expert_gate . x)",
    **_COMMON,
)

QWEN3_MOE = dataclasses.replace(QWEN2_MOE, family="Qwen3-MoE", model_types=("qwen3_moe",), moe=Moe(router=_SOFTMAX), notes=_NOTE)

OLMOE = Adapter(family="OLMoE", model_types=("olmoe",), moe=Moe(router=_SOFTMAX), notes=_NOTE, **_COMMON)

GPT_OSS = Adapter(
    family="gpt-oss",
    model_types=("gpt_oss",),
    # Top-k of the logits (with the router's bias), then a softmax over those k: the same as a softmax over every
    # expert renormalised over the k.
    moe=Moe(router=Router(path="router", renormalise=True), experts=Experts(transposed=True, interleaved=True, biases=True)),
    sinks="self_attn.sinks",
    notes=_NOTE + "; learned attention sinks: a logit per head joins the softmax and takes attention no token receives",
    **_COMMON,
)


def _mla_values(kv_b_proj, config):
    """The value vectors [batch, positions, heads, v_head_dim] from ``kv_b_proj``'s output: per head [key | value]."""
    per_head = kv_b_proj.reshape(kv_b_proj.shape[0], -1, config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim)
    return per_head[..., config.qk_nope_head_dim:]


_DEEPSEEK = dict(_COMMON, values=Cut("self_attn.kv_b_proj", _mla_values))
_DEEPSEEK_NOTE = (_NOTE + "; multi-head latent attention: keys and values come from one latent per token (kv_b_proj); "
                  "shared experts added as they are")

DEEPSEEK_V2 = Adapter(
    family="DeepSeek-V2",
    model_types=("deepseek_v2",),
    # Softmax, top-k within the best groups (scored by their best expert) where topk_method says so, no renormalisation.
    moe=Moe(router=Router(scale="routed_scaling_factor"), shared="shared_experts"),
    variants=(Variant(_first_k, _dense()),
              Variant(lambda config, layer: config.topk_method == "group_limited_greedy" and not _first_k(config, layer),
                      {"moe": Moe(router=Router(scale="routed_scaling_factor", groups="max"), shared="shared_experts")})),
    notes=_DEEPSEEK_NOTE,
    **_DEEPSEEK,
)

_SIGMOID = Router(score="sigmoid", correction="e_score_correction_bias", groups="top2", renormalise="norm_topk_prob",
                  scale="routed_scaling_factor")

DEEPSEEK_V3 = Adapter(
    family="DeepSeek-V3",
    model_types=("deepseek_v3",),
    moe=Moe(router=_SIGMOID, shared="shared_experts"),
    variants=(Variant(_first_k, _dense()),),
    notes=_DEEPSEEK_NOTE,
    **_DEEPSEEK,
)

GLM4_MOE = Adapter(
    family="GLM-4.5",
    model_types=("glm4_moe",),
    moe=Moe(router=_SIGMOID, shared="shared_experts"),
    variants=(Variant(_first_k, _dense()),),
    notes=_NOTE + "; sigmoid routing with a correction bias and group-limited top-k (as DeepSeek-V3); shared experts",
    **_COMMON,
)

LLAMA4 = Adapter(
    family="Llama-4",
    model_types=("llama4_text",),
    layers="model.layers",  # Llama4ForCausalLM names its base prefix language_model but keeps the model at .model
    sites={**_MOE_SITES, "mlp_in": ("feed_forward", "in"), "mlp_out": ("feed_forward", "out")},
    attn_proj="self_attn.o_proj",
    mlp_up="feed_forward",
    mlp_down="feed_forward",
    act_fn="feed_forward",
    mlp_norm=("post_attention_layernorm",),
    values=Cut("self_attn.v_proj"),
    moe=Moe(router=Router(path="router", score="sigmoid", on_input=True), experts=Experts(transposed=True),
            block="feed_forward", shared="shared_expert"),
    variants=(Variant(lambda config, layer: layer not in config.moe_layers, _dense("feed_forward", "activation_fn")),
              Variant(lambda config, layer: not config.no_rope_layers[layer], {"positions": False})),
    notes=_NOTE + "; the router's sigmoid weight scales each expert's input; a shared expert on every token; blocks without "
                  "rotary positions (NoPE) every fourth block",
)

_QWEN3_NEXT_MOE = dict(
    sites={site: spec for site, spec in QWEN3_NEXT.sites.items() if site not in ("mlp_gate", "mlp_up", "mlp_act")},
    mlp_up="mlp", mlp_down="mlp", act_fn="mlp", mlp_gate=None, variants=(*QWEN3_NEXT.variants, Variant(_sparse_step, _dense())),
    notes=QWEN3_NEXT.notes + "; " + _NOTE + ", plus a shared expert scaled by sigmoid(shared_expert_gate . x)",
)
QWEN3_NEXT_MOE = dataclasses.replace(
    QWEN3_NEXT, family="Qwen3-Next-MoE", model_types=("qwen3_next",), when=lambda config: config.num_experts > 0,
    moe=Moe(router=Router(renormalise="norm_topk_prob"), shared="shared_expert", shared_gate="shared_expert_gate"),
    **_QWEN3_NEXT_MOE,
)
# Qwen3.5-MoE: every block sparse, the top-k weights always renormalised.
QWEN3_5_MOE = dataclasses.replace(
    QWEN3_NEXT, family="Qwen3.5-MoE", model_types=("qwen3_5_moe_text",), when=None,
    moe=Moe(router=Router(renormalise=True), shared="shared_expert", shared_gate="shared_expert_gate"), **_QWEN3_NEXT_MOE,
)
QWEN3_5_MOE_MULTIMODAL = dataclasses.replace(QWEN3_5_MOE, model_types=("qwen3_5_moe",), layers="language_model.layers")
