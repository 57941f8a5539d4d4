"""What an atlas row says of a model's architecture (``Architecture``), read from its adapter block by block and from
the loaded modules (``architecture``): the norm placement, the token mixers, the positions, the experts, the
residual streams and the parameter count. No number here is typed in by hand for a family.

Importing this module does not load torch: the schema reads ``Architecture`` without a model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .adapters.base import Adapter

# The norm placements, as a block's adapter declares them (the order a table lists them in):
# - pre: a norm in front of each sublayer, the branch lands as it is (Llama, GPT-2, parallel blocks);
# - sandwich: a norm in front and a norm on the branch before it lands (Gemma-2/3, GLM-4);
# - reordered: no norm in front, the branch normed before it lands (OLMo-2);
# - post: the residual sum is normed (the original Transformer, BERT).
NORMS = ("pre", "sandwich", "reordered", "post")
# The token mixers: softmax attention plain, with a per-head output gate, with a learned sink logit per head, or with
# an indexer that picks each query's keys (sparse); linear attention, a short convolution, a state-space scan; none (a
# block that is its MLP alone). A block whose mixer is a sum of several run side by side counts as "summed".
MIXERS = ("softmax", "gated", "learned sink", "sparse", "summed", "linear", "convolution", "state space", "none")
SOFTMAX = ("softmax", "gated", "learned sink", "sparse", "summed")  # the mixers with attention probabilities
# The positions a softmax-attention block sees: rotary over every head dim, over some of them (partial: Phi's
# partial_rotary_factor, DeepSeek's decoupled rope dims of latent attention), learned absolute positions added to the
# embeddings (GPT-2, OPT, BERT), or none (NoPE).
POSITIONS = ("RoPE", "partial RoPE", "learned", "NoPE")
_MIXER_KINDS = {"linear": "linear", "conv": "convolution", "ssm": "state space"}


@dataclass(kw_only=True)
class Architecture:
    """A model's architecture as the adapter and the loaded modules give it. ``norms``, ``mixers``: the share of the
    blocks with each norm placement (``NORMS``) and token mixer (``MIXERS``), only those present (shares sum to 1);
    ``parallel``: the share of blocks whose attention and MLP read the same input. ``positions``: over the blocks with
    softmax attention, the share that sees each kind of position (``POSITIONS``; empty without softmax attention);
    ``rotary``: the smallest share of a head's dims that rotary positions turn, over those blocks (None without
    rotary positions). ``experts``: the routed experts of a mixture-of-experts block (None: a dense model), ``top_k``
    of them chosen per token, ``shared`` dense experts every token also goes through, in ``expert_blocks`` of the
    blocks (a share). ``streams``: the residual streams (1, or n hyper-connections). ``parameters``: every parameter
    of the loaded model, tied ones once."""

    family: str
    model_type: str
    blocks: int
    d_model: int
    parameters: int
    norms: dict[str, float]
    parallel: float
    mixers: dict[str, float]
    positions: dict[str, float]
    rotary: float | None
    experts: int | None
    top_k: int | None
    shared: int
    expert_blocks: float
    streams: int


def architecture(adapter: Adapter, model: nn.Module) -> Architecture:
    """The architecture of ``model`` (a transformers model) as its ``adapter`` declares each block."""
    from .adapters.base import text_config

    config = text_config(model)
    n_layers = len(adapter.blocks(model))
    blocks = [adapter.at(config, layer) for layer in range(n_layers)]
    softmax = [layer for layer, here in enumerate(blocks) if mixer(here) in SOFTMAX]
    rotary, learned = _rotary(model), _learned(model, config)
    turned = [rotary_share(config, layer) for layer in softmax if blocks[layer].positions] if rotary else []
    sparse = next((layer for layer, here in enumerate(blocks) if here.moe is not None), None)
    experts = None if sparse is None else _experts(adapter, model, config, sparse)
    return Architecture(
        family=adapter.family, model_type=str(config.model_type), blocks=n_layers, d_model=int(config.hidden_size),
        parameters=sum(p.numel() for p in model.parameters()),
        norms=shares([norm(here) for here in blocks], NORMS),
        parallel=sum(here.parallel for here in blocks) / n_layers,
        mixers=shares([mixer(here) for here in blocks], MIXERS),
        positions=shares([position(blocks[layer], config, layer, rotary, learned) for layer in softmax], POSITIONS),
        rotary=min(turned) if turned else None,
        experts=None if experts is None else experts[0], top_k=None if experts is None else experts[1],
        shared=0 if experts is None else experts[2],
        expert_blocks=sum(here.moe is not None for here in blocks) / n_layers,
        streams=adapter.streams(config),
    )


def shares(labels: list[str], order: tuple[str, ...]) -> dict[str, float]:
    """Each label's share of ``labels``, in ``order`` (labels absent are left out)."""
    counts = Counter(labels)
    return {label: counts[label] / len(labels) for label in order if counts[label]}


def norm(here: Adapter) -> str:
    """A block's norm placement (``NORMS``)."""
    if here.post_ln:
        return "post"
    if here.branch_norms:
        return "sandwich" if here.mlp_norm else "reordered"
    return "pre"


def mixer(here: Adapter) -> str:
    """A block's token mixer (``MIXERS``)."""
    if here.mixer is None:
        return "none"
    if here.mixer != "attention":
        return _MIXER_KINDS[here.mixer]
    if here.mixer_parts:
        return "summed"
    if here.indexer is not None:
        return "sparse"
    if here.sinks is not None:
        return "learned sink"
    return "gated" if here.gate is not None else "softmax"


def position(here: Adapter, config, layer: int, rotary: bool, learned: bool) -> str:
    """The positions softmax-attention block ``layer`` sees (``POSITIONS``): none where the adapter says so (NoPE),
    else rotary (partial where it turns only some head dims), else learned absolute positions, else none."""
    if not here.positions:
        return "NoPE"
    if rotary:
        return "RoPE" if rotary_share(config, layer) >= 1.0 else "partial RoPE"
    return "learned" if learned else "NoPE"


def rotary_share(config, layer: int) -> float:
    """The share of a query's head dims that rotary positions turn at block ``layer``: latent attention's decoupled
    rope dims over the whole query head (DeepSeek), the config's partial rotary factor (per layer type where the rope
    parameters are given per type), a rotary width in dims (GPT-J's ``rotary_dim``), else every dim."""
    from .adapters.base import layer_types

    rope, nope = getattr(config, "qk_rope_head_dim", None), getattr(config, "qk_nope_head_dim", None)
    if rope and nope is not None:
        return rope / (rope + nope)
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and isinstance(parameters.get(layer_types(config, layer)), dict):
        parameters = parameters[layer_types(config, layer)]
    for factor in ((parameters or {}).get("partial_rotary_factor") if isinstance(parameters, dict) else None,
                   getattr(config, "partial_rotary_factor", None)):
        if factor is not None:
            return float(factor)
    width = getattr(config, "rotary_dim", None)
    if width:
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return min(1.0, width / head)
    return 1.0


def _rotary(model: nn.Module) -> bool:
    """Whether the model applies rotary positions: transformers gives every rotary model a rotary-embedding module
    (``<Family>RotaryEmbedding``); a config may name rope parameters its model never applies (NoPE latent attention)."""
    return any(type(module).__name__.endswith("RotaryEmbedding") for module in model.modules())


def _learned(model: nn.Module, config) -> bool:
    """Whether learned absolute positions are added to the token embeddings: an embedding table with a row per
    position beside the token embeddings, in the module that holds them (GPT-2's ``wpe``, OPT's ``embed_positions``,
    BERT's ``position_embeddings``)."""
    from torch import nn

    tokens = model.get_input_embeddings()
    context = getattr(config, "max_position_embeddings", None)
    path = next(name for name, module in model.named_modules() if module is tokens)
    holder = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    return context is not None and any(isinstance(module, nn.Embedding) and module is not tokens and module.num_embeddings >= context
                                       for module in holder.children())


def _experts(adapter: Adapter, model: nn.Module, config, layer: int) -> tuple[int, int, int]:
    """(routed experts, chosen per token, shared experts) of mixture-of-experts block ``layer``: the experts are the
    router's rows, k the router's own setting where it has one (else the config's), and the shared experts the
    config's count where the block has a shared expert (one fused MLP may hold several)."""
    moe = adapter.at(config, layer).moe
    router = adapter.module(model, layer, moe.part(moe.router.path))
    count = int(moe.router.linear(router).weight.shape[0])
    top_k = next((getattr(source, name) for source in (router, config) for name in ("top_k", "top_k_experts", "num_experts_per_tok")
                  if isinstance(getattr(source, name, None), int)), None)
    shared = 0
    if moe.shared is not None:
        listed = next((getattr(config, name) for name in ("n_shared_experts", "num_shared_experts")
                       if isinstance(getattr(config, name, None), int)), None)
        shared = listed if listed else 1
    return count, top_k, shared
