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

from . import hybrid, llama
from .base import Cut, Experts, Mlp, Moe, Router, Variant, layer_types


def _dense(block: str = "mlp", activation: str = "act_fn") -> dict:
    """The changes that give a dense block of a mixture-of-experts model its gated MLP at ``block``."""
    return {"moe": None, "mlp": Mlp(path=block, act=activation)}


def _sparse_step(config, layer: int) -> bool:
    """Qwen-MoE's rule for a dense block: listed in ``mlp_only_layers``, off the ``decoder_sparse_step``, or no experts."""
    return (layer in getattr(config, "mlp_only_layers", []) or not getattr(config, "num_experts", 0)
            or (layer + 1) % getattr(config, "decoder_sparse_step", 1) != 0)


def _listed_dense(config, layer: int) -> bool:
    """The rule of the families that list each block's MLP in ``mlp_layer_types``: dense where it says "dense"."""
    return config.mlp_layer_types[layer] == "dense"


def _first_k(config, layer: int) -> bool:
    """DeepSeek's and GLM's rule: the first ``first_k_dense_replace`` blocks are dense."""
    return layer < config.first_k_dense_replace


def _sparse(base, family: str, model_types: tuple[str, ...], moe: Moe, **changes):
    """``base`` (a dense family's adapter) with a mixture of experts for its MLP: the scan reads the block's input and
    output (the neurons inside fused experts are not modules)."""
    return dataclasses.replace(base, family=family, model_types=model_types, mlp=None, moe=moe, **changes)


_NOTE = "mixture-of-experts MLP: attributed to the routed experts (router weight x expert output), then to neurons inside them"
_SOFTMAX = Router(renormalise="norm_topk_prob")  # softmax over every expert, top-k, renormalised where the config says
_QWEN_SHARED = dict(shared=Mlp(path="shared_expert"), shared_gate="shared_expert_gate")  # scaled by sigmoid(gate . x)
_DEEPSEEK_SHARED = Mlp(path="shared_experts")  # added as it is

MIXTRAL = _sparse(llama.ADAPTER, "Mixtral", ("mixtral",), Moe(router=Router(renormalise=True)), notes=_NOTE)

QWEN2_MOE = _sparse(
    llama.ADAPTER, "Qwen2-MoE", ("qwen2_moe",), Moe(router=_SOFTMAX, **_QWEN_SHARED),
    variants=(Variant(when=_sparse_step, changes=_dense()),),
    notes=_NOTE + ", plus a shared expert scaled by sigmoid(shared_expert_gate . x)",
)

QWEN3_MOE = dataclasses.replace(QWEN2_MOE, family="Qwen3-MoE", model_types=("qwen3_moe",), moe=Moe(router=_SOFTMAX), notes=_NOTE)

OLMOE = _sparse(llama.ADAPTER, "OLMoE", ("olmoe",), Moe(router=_SOFTMAX), notes=_NOTE)

GPT_OSS = _sparse(
    llama.ADAPTER, "gpt-oss", ("gpt_oss",),
    # Top-k of the logits (with the router's bias), then a softmax over those k: the same as a softmax over every
    # expert renormalised over the k.
    Moe(router=Router(path="router", renormalise=True), experts=Experts(transposed=True, interleaved=True, biases=True)),
    sinks="self_attn.sinks",
    notes=_NOTE + "; learned attention sinks: a logit per head joins the softmax and takes attention no token receives",
)


def _mla_values(kv_b_proj, config):
    """The value vectors [batch, positions, heads, v_head_dim] from ``kv_b_proj``'s output: per head [key | value]."""
    per_head = kv_b_proj.reshape(kv_b_proj.shape[0], -1, config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim)
    return per_head[..., config.qk_nope_head_dim:]


_DEEPSEEK_NOTE = (_NOTE + "; multi-head latent attention: keys and values come from one latent per token (kv_b_proj); "
                  "shared experts added as they are")
# Latent attention's queries and keys are a latent's up-projections beside the decoupled rope dims: not read per head.
_MLA = dataclasses.replace(llama.ADAPTER, values=Cut("self_attn.kv_b_proj", _mla_values), queries=(), keys=())
# Softmax, top-k within the best groups (scored by their best expert) where topk_method says so, no renormalisation.
_DEEPSEEK_V2_ROUTER = Router(scale="routed_scaling_factor")

DEEPSEEK_V2 = _sparse(
    _MLA, "DeepSeek-V2", ("deepseek_v2",), Moe(router=_DEEPSEEK_V2_ROUTER, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_first_k, changes=_dense()),
              Variant(when=lambda config, layer: config.topk_method == "group_limited_greedy" and not _first_k(config, layer),
                      changes={"moe": Moe(router=dataclasses.replace(_DEEPSEEK_V2_ROUTER, groups="max"), shared=_DEEPSEEK_SHARED)})),
    notes=_DEEPSEEK_NOTE,
)

_SIGMOID = Router(score="sigmoid", correction="e_score_correction_bias", groups="top2", renormalise="norm_topk_prob",
                  scale="routed_scaling_factor")

DEEPSEEK_V3 = _sparse(
    _MLA, "DeepSeek-V3", ("deepseek_v3",), Moe(router=_SIGMOID, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_first_k, changes=_dense()),),
    notes=_DEEPSEEK_NOTE,
)

GLM4_MOE = _sparse(
    llama.ADAPTER, "GLM-4.5", ("glm4_moe",), Moe(router=_SIGMOID, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_first_k, changes=_dense()),),
    notes=_NOTE + "; sigmoid routing with a correction bias and group-limited top-k (as DeepSeek-V3); shared experts",
)

LLAMA4 = _sparse(
    llama.ADAPTER, "Llama-4", ("llama4_text",),
    # The router's sigmoid weight scales the expert's input; the experts return one row block per expert.
    Moe(router=Router(path="router", score="sigmoid", on_input=True), experts=Experts(transposed=True, stacked=True),
        block="feed_forward", shared=Mlp(path="shared_expert", act="activation_fn")),
    layers="model.layers",  # Llama4ForCausalLM names its base prefix language_model but keeps the model at .model
    flat_rows=True,  # the mixture-of-experts block returns [batch x positions, d]
    variants=(Variant(when=lambda config, layer: layer not in config.moe_layers, changes=_dense("feed_forward", "activation_fn")),
              Variant(when=lambda config, layer: not config.no_rope_layers[layer], changes={"positions": False})),
    notes=_NOTE + "; the router's sigmoid weight scales each expert's input; a shared expert on every token; blocks without "
                  "rotary positions (NoPE) every fourth block",
)

_QWEN3_NEXT_MOE = dict(
    variants=(*hybrid.QWEN3_NEXT.variants, Variant(when=_sparse_step, changes=_dense())),
    notes=hybrid.QWEN3_NEXT.notes + "; " + _NOTE + ", plus a shared expert scaled by sigmoid(shared_expert_gate . x)",
)
QWEN3_NEXT_MOE = _sparse(
    hybrid.QWEN3_NEXT, "Qwen3-Next-MoE", ("qwen3_next",), Moe(router=Router(renormalise="norm_topk_prob"), **_QWEN_SHARED),
    when=lambda config: config.num_experts > 0, **_QWEN3_NEXT_MOE,
)
# Qwen3.5-MoE: every block sparse, the top-k weights always renormalised.
QWEN3_5_MOE = _sparse(
    hybrid.QWEN3_NEXT, "Qwen3.5-MoE", ("qwen3_5_moe_text",), Moe(router=Router(renormalise=True), **_QWEN_SHARED), when=None,
    **_QWEN3_NEXT_MOE,
)
QWEN3_5_MOE_MULTIMODAL = dataclasses.replace(QWEN3_5_MOE, model_types=("qwen3_5_moe",), layers="language_model.layers")

# Kimi-Linear: DeepSeek-V3's latent attention and routing, with Kimi Delta Attention (a gated linear attention, at
# ``self_attn`` too) in most blocks; ``mlp_layer_types`` says which blocks are dense.
KIMI_LINEAR = _sparse(
    _MLA, "Kimi-Linear", ("kimi_linear",), Moe(router=_SIGMOID, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_listed_dense, changes=_dense()),
              Variant(when=lambda config, layer: layer_types(config, layer) == "linear_attention",
                      changes={"mixer": "linear", "values": None})),
    notes="hybrid: Kimi Delta Attention (linear attention, self_attn) in most blocks, multi-head latent attention in the others; "
          + _NOTE + "; DeepSeek-V3's sigmoid routing with a correction bias; shared experts added as they are",
)
