"""One declarative adapter per architecture family: where each canonical site lives in a block.

A site is read either at a module's input ("in") or at its output ("out"); the path is relative to the block ("" is
the block itself). A third element ``(index, count)`` takes one of ``count`` equal chunks of the last dim, for fused
projections (Phi-3's ``gate_up_proj`` holds the gate, then up). Adding a family means adding one ``Adapter`` with
its own module paths; ``when`` picks among variants of one model type by its config (parallel or sequential
blocks, pre- or post-LN), and ``variants`` change it at some layers only (a convolution or linear-attention mixer
in a hybrid, a layer without rotary positions): ``Adapter.at(config, layer)`` is the adapter of one block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

SiteSpec = tuple  # (path, "in" | "out") or (path, "in" | "out", (chunk index, chunk count))
# What mixes the tokens in a block: softmax attention (which has attention probabilities and can have a sink), a
# linear attention (a recurrence, e.g. Gated DeltaNet) or a short convolution. Only softmax layers have sink metrics.
MIXERS = ("attention", "linear", "conv")


@dataclass(frozen=True)
class Variant:
    """A change to an adapter at some layers: ``when(config, layer)`` says at which; ``changes`` are the ``Adapter``
    fields it sets there (``sites`` is merged into the family's sites; a site set to None is removed there)."""

    when: Callable[[object, int], bool]
    changes: Mapping[str, object]


def kv_heads(config) -> int:
    """How many key/value heads the attention has (grouped-query attention: fewer than the query heads)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def per_head(output: torch.Tensor, config) -> torch.Tensor:
    """A projection's output [batch, positions, kv x head_dim] as [batch, positions, kv, head_dim]."""
    return output.view(*output.shape[:2], kv_heads(config), -1)


@dataclass(frozen=True)
class Cut:
    """Where a per-head quantity is read: the module ``path`` (in the block) whose output holds it, and ``take``, which
    cuts it out of that output as [batch, positions, heads, head_dim] given the config: the value vectors (one per
    key/value head; from a fused q | k | v projection, or from a latent's per-head [key | value] rows), or an output
    gate's pre-activations (one per query head)."""

    path: str
    take: Callable[[torch.Tensor, object], torch.Tensor] = per_head


@dataclass(frozen=True)
class Router:
    """How a mixture-of-experts block picks a token's experts from its router's logits (x . W^T, + b where the router
    has a bias), at the router module ``path`` in the block:

    - ``score``: "softmax" (a probability over every expert) or "sigmoid" (each expert scored alone);
    - ``correction``: the router's buffer holding a per-expert bias that moves the choice but not the weights
      (DeepSeek-V3's ``e_score_correction_bias``);
    - ``groups``: only the experts of the best ``topk_group`` of ``n_group`` equal groups compete, a group scored by its
      best expert ("max", DeepSeek-V2's group-limited greedy) or the sum of its two best ("top2", DeepSeek-V3);
    - the ``top_k`` best are chosen; their weights are the scores, divided by their sum where ``renormalise`` (True,
      or the name of the router's or the config's flag that says so), then times ``scale`` (the attribute holding a
      routed scaling factor);
    - ``on_input``: the weight multiplies the expert's input instead of its output (Llama-4: sigmoid of the top-k
      logits, on the input).

    ``top_k``, ``n_group``, ``topk_group`` and the flags are read from the router module, else from the config."""

    path: str = "gate"
    score: str = "softmax"
    correction: str | None = None
    groups: str | None = None
    renormalise: bool | str = False
    scale: str | None = None
    on_input: bool = False


@dataclass(frozen=True)
class Experts:
    """A block's routed experts, fused in 3-D parameters of the module ``path``: ``gate_up_proj`` [experts, 2 ff, d]
    (gate rows, then up rows) and ``down_proj`` [experts, d, ff]; ``transposed`` stores them [experts, d, 2 ff] and
    [experts, ff, d] (x @ W); ``interleaved``: gate and up alternate column by column; ``biases``:
    ``gate_up_proj_bias`` and ``down_proj_bias``. A neuron's activation is the module's own ``_apply_gate`` of the
    fused pre-activations where it has one (gpt-oss's clamped SwiGLU), else act_fn(gate) x up."""

    path: str = "experts"
    transposed: bool = False
    interleaved: bool = False
    biases: bool = False


@dataclass(frozen=True)
class Moe:
    """A sparse mixture-of-experts MLP: the block at ``block`` (in the decoder layer), its ``router`` and ``experts``,
    and a dense ``shared`` expert every token also goes through (its module path in the block; ``shared_gate``: a
    1-output linear whose sigmoid scales it, Qwen's ``shared_expert_gate``; None: added as it is)."""

    router: Router = Router()
    experts: Experts = Experts()
    block: str = "mlp"
    shared: str | None = None
    shared_gate: str | None = None


def layer_types(config, layer: int) -> str:
    """The kind of attention the config gives ``layer`` (``layer_types``: full, sliding, linear, conv...), or "" where
    the config does not vary it."""
    kinds = getattr(config, "layer_types", None)
    return str(kinds[layer]) if kinds and layer < len(kinds) else ""


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    layers: str  # path of the block list in the base model (LlamaModel: "layers"), whatever head wraps it
    sites: dict[str, SiteSpec]
    attn_proj: str  # the token mixer's output projection (attention's o_proj, a convolution's out_proj)
    mlp_up: str
    mlp_down: str
    act_fn: str | Callable[[torch.Tensor], torch.Tensor]  # the MLP's activation module, or the function it calls
    mlp_gate: str | None = None
    # The norm that makes mlp_in from the stream the MLP reads (resid_mid, or resid_in in parallel blocks); the first
    # of these paths the block has. Empty in post-LN blocks, whose MLP reads resid_mid = LN(attn_sum) itself.
    mlp_norm: tuple[str, ...] = ()
    # Sandwich norms: the landed site -> the norm that sits between the sublayer's raw output and the residual.
    branch_norms: dict[str, str] = field(default_factory=dict)
    # Where massive activations are detected: each block's output, or for post-LN blocks the residual sum that
    # enters the block's last LayerNorm (the massive value may live only there, never in the normed output).
    stream: str = "resid_out"
    encoder: bool = False  # bidirectional (BERT-like): loaded with its masked-LM head, no perplexity
    moe: Moe | None = None  # the MLP is a sparse mixture of experts (a variant gives the dense blocks their MLP)
    when: Callable[[object], bool] | None = None  # this variant applies to a config when this says so
    notes: str = ""  # what the report should say about this family's blocks
    # The token mixer (see MIXERS); where its value vectors are (None: not read, e.g. q, k, v fused per head in a
    # config-dependent layout); an output gate per head (gated attention: out = attention x sigmoid(gate));
    # a learned sink logit per head that joins the softmax (the parameter's path in the block).
    mixer: str = "attention"
    values: Cut | None = None
    gate: Cut | None = None
    sinks: str | None = None
    positions: bool = True  # whether the mixer sees positions (rotary or learned); a NoPE layer does not
    # Encoders whose position ids start after the padding index (RoBERTa): how many positions that costs.
    position_offset: Callable[[object], int] = lambda config: 0
    variants: tuple[Variant, ...] = ()

    def at(self, config, layer: int) -> Adapter:
        """The adapter of block ``layer``: the family's, with the changes of every variant that applies there."""
        if not self.variants:
            return self
        applies = tuple(bool(v.when(config, layer)) for v in self.variants)
        key = (id(self), applies)
        if key not in _AT:
            sites, changes = dict(self.sites), {}
            for variant in (v for v, on in zip(self.variants, applies) if on):
                for name, value in variant.changes.items():
                    if name == "sites":
                        sites.update(value)
                    else:
                        changes[name] = value
            sites = {site: spec for site, spec in sites.items() if spec is not None}
            _AT[key] = dataclasses.replace(self, sites=sites, variants=(), **changes)
        return _AT[key]

    def routers(self, config, layer: int) -> tuple[str, ...]:
        """Paths in block ``layer`` of the modules that route its tokens to experts (none in a dense block). They are
        no block projection: a quantization engine leaves them as they are (Llama-4's router is an ``nn.Linear`` whose
        forward returns scores and logits, which an engine's quantized linear would not)."""
        moe = self.at(config, layer).moe
        return (f"{moe.block}.{moe.router.path}",) if moe is not None else ()

    @property
    def gated(self) -> bool:
        return self.mlp_gate is not None

    @property
    def parallel(self) -> bool:
        """Attention and MLP both read the block input: there is no resid_mid between them."""
        return "resid_mid" not in self.sites

    @property
    def post_ln(self) -> bool:
        return self.stream == "resid_sum"

    def mlp_norm_module(self, model: nn.Module, layer: int) -> tuple[str, nn.Module] | None:
        """(path, module) of the norm in front of the MLP, or None where the MLP reads the stream unnormed."""
        block = self.module(model, layer, "")
        path = next((p for p in self.at(text_config(model), layer).mlp_norm if _has_submodule(block, p)), None)
        return (path, block.get_submodule(path)) if path is not None else None

    def activation(self, model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's activation function at block ``layer`` (its module, or the function the MLP calls)."""
        act = self.at(text_config(model), layer).act_fn
        return self.module(model, layer, act) if isinstance(act, str) else act

    def raw(self, site: str) -> str:
        """The site holding a branch's own output before any norm: ``mlp_raw`` behind a sandwich norm, else itself."""
        raw = site.replace("_out", "_raw")
        return raw if site in self.branch_norms else site

    def layers_path(self, model: nn.Module) -> str:
        """The block list's path in ``model``: under the base model's prefix when a head wraps it."""
        prefix = getattr(model, "base_model_prefix", "")
        return f"{prefix}.{self.layers}" if prefix and isinstance(getattr(model, prefix, None), nn.Module) else self.layers

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path(model))

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.get_submodule(path) if path else block

    def param_name(self, model: nn.Module, layer: int, path: str, parameter: str = "weight") -> str:
        """Full parameter name, as ``model.get_parameter`` takes it."""
        return f"{self.layers_path(model)}.{layer}.{path}.{parameter}"

    def input_rows(self, model: nn.Module, layer: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [d_mlp, d_model] weight (a view: writes reach the model) and bias of the projection that makes
        ``mlp_up`` or ``mlp_gate``, this site's rows only when the projection is fused."""
        here = self.at(text_config(model), layer)
        path = here.mlp_gate if site == "mlp_gate" else here.mlp_up
        module = self.module(model, layer, path)
        weight, bias = weight_out_in(module), bias_of(module)
        chunk = here.sites[site][2] if len(here.sites[site]) > 2 else None
        if chunk is not None:
            index, count = chunk
            size = weight.shape[0] // count
            weight = weight[index * size : (index + 1) * size]
            bias = bias[index * size : (index + 1) * size] if bias is not None else None
        return weight, bias


_AT: dict[tuple[int, tuple[bool, ...]], Adapter] = {}  # each family's adapter per combination of its variants


def text_config(model: nn.Module):
    """The config of the model's language part: the model's own, or a multimodal model's text config (Gemma-3 from 4B
    up keeps hidden_size, num_hidden_layers and the layer types there)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as [out_features, in_features], whatever the storage.

    GPT-2's Conv1D stores [in, out] (y = x @ W + b), nn.Linear stores [out, in] (y = x @ W.T + b).
    """
    return module.weight.T if is_transposed(module) else module.weight


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and hasattr(module, "nf")


def stored_index(module: nn.Module, out_index: int, in_index: int) -> tuple[int, int]:
    """(row, col) of W[out_index, in_index] in the parameter as it is stored."""
    return (in_index, out_index) if is_transposed(module) else (out_index, in_index)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
