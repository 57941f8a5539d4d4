"""Mixtures of experts of the newer families: MiniMax-M2, ERNIE-4.5-MoE, EXAONE-MoE, Cohere-2-MoE, AFMoE, MiMo-V2-Flash
and Laguna. Their experts are transformers' fused 3-D experts (gate rows then up rows, [experts, 2 ff, d]); what sets
them apart is the router, declared in each ``Router``:

- MiniMax-M2: sigmoid scores, a correction bias on the block (passed to the router), top-k renormalised;
- ERNIE-4.5-MoE: softmax, a correction bias in the router's ``moe_statics``, top-k renormalised; shared experts;
- EXAONE-MoE and MiMo-V2-Flash: DeepSeek-V3's sigmoid with a correction bias, group-limited top-k and a scaling factor;
- Cohere-2-MoE: top-k of the logits, then a softmax over the k (or their sigmoids, renormalised where the config says);
  the shared experts are added, or averaged with the routed ones;
- AFMoE: sigmoid with a correction bias on the block (passed to the router, whose weight is in its ``gate``),
  renormalised, times ``route_scale``;
- Laguna: sigmoid of softcapped logits with a correction bias, renormalised; the block scales the experts' sum by
  ``moe_routed_scaling_factor`` after the router.

Their dense blocks (``mlp_layer_types``, ``num_dense_layers``, ERNIE's interval and range) are variants with the dense
MLP. Attention quirks: Cohere-2-MoE's block is parallel (attention and experts read one norm); AFMoE has sandwich norms
around both sublayers and a sigmoid output gate per head; MiMo-V2-Flash's sliding-window blocks have twice the key/value
heads and a learned sink logit per head; EXAONE-MoE, AFMoE and Cohere-2-MoE leave rotary positions out of their
full-attention blocks; Laguna gates each head's output by softplus (not read: massact reads sigmoid gates).
"""

from __future__ import annotations

import dataclasses

from ...errors import UsageError
from . import llama
from .base import Cut, Moe, Router, Variant, kv_heads, layer_types
from .moe import _DEEPSEEK_SHARED, _NOTE, _SIGMOID, _dense, _listed_dense, _sparse

_SHARED = " plus shared experts added as they are"


def _not_sparse(config, layer: int) -> bool:
    """The rule of the families whose code takes every block ``mlp_layer_types`` does not call "sparse" as dense
    (the others' rule, "dense" where it says so, is ``moe._listed_dense``)."""
    return config.mlp_layer_types[layer] != "sparse"


MINIMAX_M2 = _sparse(
    llama.ADAPTER, "MiniMax-M2", ("minimax_m2",),
    Moe(router=Router(score="sigmoid", correction="e_score_correction_bias", passed=True, renormalise=True)),
    notes=_NOTE + "; sigmoid routing with a correction bias (the block's e_score_correction_bias), top-k renormalised",
)


def _ernie_dense(config, layer: int) -> bool:
    """ERNIE-4.5-MoE's rule: a block has experts every ``moe_layer_interval`` blocks from ``moe_layer_start_index`` to
    ``moe_layer_end_index``; the others are dense."""
    return not ((layer + 1) % config.moe_layer_interval == 0
                and config.moe_layer_start_index <= layer <= config.moe_layer_end_index)


_ERNIE_ROUTER = Router(correction="moe_statics.e_score_correction_bias", renormalise=True)

ERNIE4_5_MOE = _sparse(
    llama.ADAPTER, "ERNIE-4.5-MoE", ("ernie4_5_moe",), Moe(router=_ERNIE_ROUTER, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=lambda config, layer: not config.moe_num_shared_experts, changes={"moe": Moe(router=_ERNIE_ROUTER)}),
              Variant(when=_ernie_dense, changes=_dense())),
    notes=_NOTE + "; softmax routing whose choice a correction bias moves (moe_statics), top-k renormalised;" + _SHARED,
)

EXAONE_MOE = _sparse(
    llama.ADAPTER, "EXAONE-MoE", ("exaone_moe",), Moe(router=_SIGMOID, shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_not_sparse, changes=_dense()),
              # With a sliding window, the full-attention blocks skip the rotary embedding ("global NoPE").
              Variant(when=lambda config, layer: config.sliding_window is not None and layer_types(config, layer) != "sliding_attention",
                      changes={"positions": False})),
    notes=_NOTE + "; sigmoid routing with a correction bias and group-limited top-k (as DeepSeek-V3);" + _SHARED
                + "; full-attention blocks use no rotary positions",
)


def _cohere_moe(score: str, strategy: str | None) -> Moe:
    """Cohere-2-MoE's mixture of experts: top-k of the logits, weighted by a softmax over the k (the same as a softmax
    over every expert renormalised over the k) or by their sigmoids (renormalised where ``norm_topk_prob``); with
    shared experts added ("sum") or averaged with the routed ones ("average": 0.5 each, after the router)."""
    router = Router(renormalise=True) if score == "softmax" else Router(score="sigmoid", renormalise="norm_topk_prob")
    if strategy == "average":
        return Moe(router=dataclasses.replace(router, scale=0.5, scaled_after=True), shared=_DEEPSEEK_SHARED, shared_scale=0.5)
    return Moe(router=router, shared=_DEEPSEEK_SHARED if strategy else None)


def _cohere_kind(score: str, strategy: str | None):
    def when(config, layer: int) -> bool:
        shared = config.shared_expert_combination_strategy if config.num_shared_experts > 0 else None
        return config.expert_selection_fn == score and shared == strategy
    return when


COHERE2_MOE = _sparse(
    dataclasses.replace(llama.ADAPTER, parallel=True, mlp_norm=("input_layernorm",)), "Cohere-2-MoE", ("cohere2_moe",),
    _cohere_moe("softmax", None),
    # The router and the shared experts as the config sets them; the dense blocks last (they have no experts).
    variants=(*(Variant(when=_cohere_kind(score, strategy), changes={"moe": _cohere_moe(score, strategy)})
                for score in ("softmax", "sigmoid") for strategy in (None, "sum", "average")
                if (score, strategy) != ("softmax", None)),
              Variant(when=_listed_dense, changes=_dense()),
              # Only sliding-window blocks use rotary positions, and the dense prefix blocks where their pattern is 1.
              Variant(when=lambda config, layer: not (layer_types(config, layer) == "sliding_attention"
                                                      or (_listed_dense(config, layer)
                                                          and config.prefix_dense_sliding_window_pattern == 1)),
                      changes={"positions": False})),
    notes="parallel block: attention and the experts read the same normed input (one shared input_layernorm); " + _NOTE
          + "; top-k of the logits, weighted by a softmax over them (or their sigmoids); shared experts added or averaged "
            "where the config has them; full-attention blocks use no rotary positions",
)


def _per_query_head(output, config):
    """An output gate's pre-activations [batch, positions, heads, head_dim] from a projection of heads x head_dim."""
    return output.view(*output.shape[:2], config.num_attention_heads, -1)


AFMOE = _sparse(
    llama.ADAPTER, "AFMoE", ("afmoe",),
    Moe(router=Router(path="router", weight="gate", score="sigmoid", correction="expert_bias", passed=True, batched=True,
                      renormalise=True, scale="route_scale"),
        shared=_DEEPSEEK_SHARED),
    mlp_norm=("pre_mlp_layernorm",),
    branch_norms={"attn_out": "post_attention_layernorm", "mlp_out": "post_mlp_layernorm"},
    gate=Cut("self_attn.gate_proj", _per_query_head),
    variants=(Variant(when=lambda config, layer: layer < config.num_dense_layers, changes=_dense()),
              Variant(when=lambda config, layer: layer_types(config, layer) != "sliding_attention", changes={"positions": False})),
    notes=_NOTE + "; sigmoid routing with a correction bias (the block's expert_bias), top-k renormalised, times route_scale;"
                + _SHARED + "; sandwich norms: each branch is normed (post_attention_layernorm, post_mlp_layernorm) before it "
                "lands; gated attention (output x sigmoid(gate_proj) per head); full-attention blocks use no rotary positions",
)


def _swa_values(v_proj, config):
    """The value vectors [batch, positions, kv, v_head_dim] of a MiMo-V2-Flash sliding-window block: twice the
    config's key/value heads."""
    return v_proj.view(*v_proj.shape[:2], 2 * kv_heads(config), -1)


MIMO_V2_FLASH = _sparse(
    llama.ADAPTER, "MiMo-V2-Flash", ("mimo_v2_flash",), Moe(router=_SIGMOID),
    variants=(Variant(when=_not_sparse, changes=_dense()),
              Variant(when=lambda config, layer: layer_types(config, layer) == "sliding_attention",
                      changes={"sinks": "self_attn.sinks", "values": Cut("self_attn.v_proj", _swa_values)})),
    notes=_NOTE + "; sigmoid routing with a correction bias and group-limited top-k (as DeepSeek-V3), no shared expert; "
                  "sliding-window blocks have twice the key/value heads and learned attention sinks (a logit per head that "
                  "joins the softmax)",
)

def _uniform_heads(config) -> bool:
    """Laguna may give each block its own head count (``num_attention_heads_per_layer``); massact's attention passes
    take one count for every block, so such a config is refused in one line."""
    counts = set(config.num_attention_heads_per_layer or [config.num_attention_heads])
    if counts != {config.num_attention_heads}:
        raise UsageError(f"this Laguna config gives its blocks {len(counts)} different head counts "
                         f"(num_attention_heads_per_layer); massact maps Laguna only with {config.num_attention_heads} "
                         "heads in every block")
    return True


LAGUNA = _sparse(
    llama.ADAPTER, "Laguna", ("laguna",),
    Moe(router=Router(score="sigmoid", correction="e_score_correction_bias", renormalise=True,
                      softcap="router_logit_softcapping", scale="moe_routed_scaling_factor", scaled_after=True),
        shared=_DEEPSEEK_SHARED),
    variants=(Variant(when=_not_sparse, changes=_dense()),),
    when=_uniform_heads,
    notes=_NOTE + "; sigmoid routing of softcapped logits with a correction bias, top-k renormalised; the block scales the "
                  "experts' sum by moe_routed_scaling_factor;" + _SHARED + "; each head's output is gated by softplus(g_proj) "
                  "(the gate is not measured)",
)

ADAPTERS = (MINIMAX_M2, ERNIE4_5_MOE, EXAONE_MOE, COHERE2_MOE, AFMOE, MIMO_V2_FLASH, LAGUNA)
