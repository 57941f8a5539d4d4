"""One declarative adapter per architecture family: the modules of its block, declared once, and the canonical sites
derived from them.

A family declares its block as a component tree: the token mixer (``attention`` and its output projection), the MLP
(``Mlp``: its up, gate and down projections and activation) or the mixture of experts (``Moe``), and its norms
(``mlp_norm``, ``branch_norms``, ``post_norms``), with the flags that place them (``parallel``). ``block_sites``
computes every site from that tree, so a path is stated once. A site is read either at a module's input ("in") or at
its output ("out"); the path is relative to the block ("" is the block itself). A third element ``(index, count)``
takes one of ``count`` equal chunks of the last dim, for fused projections (Phi-3's ``gate_up_proj`` holds the gate,
then up). A block that multiplies each branch by a number before it lands (``branch_scale``) has its landed sites
read at the sublayer's output and multiplied by it (``Adapter.landing``). A branch that no single module returns is
a ``Summed`` site: the sum of several modules' outputs (its ``Part``s), each times a factor (Falcon-H1's Mamba-2 and
attention side by side, Granite-4.0-H's experts beside its shared MLP). Layouts are declared too: projections that
store their weight [in, out] (``in_out``), MLP modules that see flat rows (``flat_rows``), experts stored transposed or
run one row block per expert (``Experts``).

``when`` picks among variants of one model type by its config (parallel or sequential blocks, pre- or post-LN), and
``variants`` change it at some layers only (a convolution or linear-attention mixer in a hybrid, a layer without
rotary positions): ``Adapter.at(config, layer)`` is the adapter of one block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# A number a module's output is multiplied by: the config attribute holding it, the number itself, or (the config
# attribute holding a list, the index of the number in it: Falcon-H1's mlp_multipliers hold the gate's and the down
# projection's).
Factor = str | float | tuple[str, int]


def factor_of(config, factor: Factor) -> float:
    """The number ``factor`` stands for in ``config``."""
    if isinstance(factor, str):
        return float(getattr(config, factor))
    if isinstance(factor, tuple):
        name, index = factor
        return float(getattr(config, name)[index])
    return float(factor)


@dataclass(frozen=True, kw_only=True)
class Part:
    """One module whose output is a term of a ``Summed`` site: its ``path`` in the block, the ``factor`` the block
    multiplies its output by before the sum, and ``projection``, the path in it of the linear that writes d_model (""
    where it holds no single one: a mixture of experts)."""

    path: str
    factor: Factor = 1.0
    projection: str = ""


@dataclass(frozen=True)
class Summed:
    """A site no module returns: the sum of several modules' outputs at the block, each times its part's factor
    (Falcon-H1's attn_out: the Mamba-2 scan's and the attention's; Granite-4.0-H's mlp_out: the routed experts' and
    the shared MLP's). ``parts`` are in the order the block calls them: the sum is whole when the last has run. Read
    by ``capture.hooks.tap``, written by ``capture.edits.edit_site`` (through its last part)."""

    parts: tuple[Part, ...]

    def factors(self, config) -> list[float]:
        """Each part's factor, in order."""
        return [factor_of(config, part.factor) for part in self.parts]

    def watch(self, block: nn.Module, config, fn: Callable[[torch.Tensor], None]) -> list:
        """Forward hooks on the parts in ``block`` that call ``fn(total)`` once per forward, when the last part has
        run: total = the sum over the parts of each one's output (the first element of a tuple) times its factor,
        added in call order as the block adds them. Returns the handles."""
        factors = self.factors(config)
        total: list[torch.Tensor | None] = [None]

        def add(index: int, output) -> None:
            output = output[0] if isinstance(output, (tuple, list)) else output
            term = output * factors[index] if factors[index] != 1.0 else output
            total[0] = term if index == 0 else total[0] + term
            if index == len(factors) - 1:
                done, total[0] = total[0], None
                fn(done)

        return [block.get_submodule(part.path).register_forward_hook(lambda m, args, output, index=index: add(index, output))
                for index, part in enumerate(self.parts)]


# (path, "in" | "out"), (path, "in" | "out", (chunk index, chunk count)), or a sum of module outputs (``Summed``)
SiteSpec = tuple | Summed
# What mixes the tokens in a block: softmax attention (which has attention probabilities and can have a sink), a
# linear attention (a recurrence, e.g. Gated DeltaNet), a short convolution or a state-space model (Mamba, Mamba-2: a
# selective scan). Each writes the stream through its output projection; only softmax layers have sink metrics.
MIXERS = ("attention", "linear", "conv", "ssm")
BRANCHES = ("attn_out", "mlp_out")  # the sites where a block's two branches land in the residual


@dataclass(frozen=True, kw_only=True)
class Variant:
    """A change to an adapter at some layers: ``when(config, layer)`` says at which; ``changes`` are the ``Adapter``
    fields it sets there (the sites are derived again from the changed tree)."""

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


@dataclass(frozen=True, kw_only=True)
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
      logits, on the input);
    - ``table``: hash routing, the router's buffer [vocab, top_k] that names each token id's experts (DeepSeek-V4's
      ``tid2eid`` in its first blocks): the choice is a fixed function of the token id, the weights are still the
      scores of the chosen experts (renormalised and scaled as above). The router is called with the token ids.

    ``score`` may also be "sqrtsoftplus" (sqrt(softplus(logit)) per expert, DeepSeek-V4).

    A router that prepares its own input (Gemma-4's reads the unnormed stream): ``norm``, the router's gainless RMS
    norm (its module path: x / sqrt(mean x^2 + its ``eps``)), then ``input_scales``, the router's attributes (a per-dim
    parameter or a number) that multiply the normed input before the linear; ``expert_scale``, the router's per-expert
    parameter that multiplies each chosen expert's weight after the renormalisation.

    ``top_k``, ``n_group``, ``topk_group`` and the flags are read from the router module, else from the config.

    Where routers differ in how they are laid out or called:

    - ``weight``: the linear in the router module that holds its [experts, d_model] weight ("": the module itself;
      AFMoE's router keeps it in ``gate``);
    - ``correction`` is a path in the router module (ERNIE-4.5 keeps it in ``moe_statics``), or where ``passed`` in
      the mixture-of-experts block, which passes it to the router's forward after the hidden states (MiniMax-M2,
      AFMoE);
    - ``batched``: the router takes the hidden states as [batch, positions, d_model], not as rows (AFMoE);
    - ``softcap``: the router's attribute holding c, which caps the logits to c x tanh(logits / c) where c > 0
      (Laguna);
    - ``scale`` may be the factor itself, a number; ``scaled_after``: the block multiplies the experts' weighted sum by
      it after the router returned its weights (Laguna, Cohere-2-MoE's average with the shared expert), where other
      routers scale the weights they return."""

    path: str = "gate"
    score: str = "softmax"
    correction: str | None = None
    groups: str | None = None
    renormalise: bool | str = False
    scale: str | float | None = None
    on_input: bool = False
    weight: str = ""
    passed: bool = False
    batched: bool = False
    softcap: str | None = None
    scaled_after: bool = False
    table: str | None = None
    norm: str | None = None
    input_scales: tuple[str, ...] = ()
    expert_scale: str | None = None

    def linear(self, router: nn.Module) -> nn.Module:
        """The module of ``router`` (the router module) that holds its weight."""
        return router.get_submodule(self.weight) if self.weight else router


@dataclass(frozen=True, kw_only=True)
class Connection:
    """One sublayer's hyper-connection: the module ``path`` (in the block) that computes, from the N streams, the
    weights around the sublayer, and where its output tuple holds them: ``write`` [batch, positions, N], the weight
    with which the sublayer's output is added to each stream; ``mix`` [batch, positions, N, N], the stream-mixing
    matrix m with new stream k = sum_j m[j, k] x stream j + write[k] x output (None: each stream carries itself over,
    m the identity). The combination the sublayer reads is the adapter's ``attn_read`` or ``mlp_read`` site;
    ``read_weights(module, streams)`` recomputes the weights it is made with from the module and its input, as
    [batch, positions, N] (one number per stream) or [batch, positions, N, width] (per stream and dim), so that
    read = sum_j weights[j] x stream j (the per-token weights held at their values, as a norm's factor is)."""

    path: str
    write: int
    mix: int | None = None
    read_weights: Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class HyperConnections:
    """The residual is N streams (hyper-connections): the block's input, middle and output (resid_in, resid_mid,
    resid_out) hold N vectors of d_model per position, N the config's ``streams`` attribute, stored [batch, positions,
    N, d_model] or, ``flat``, [batch, positions, N x d_model] (stream-major). Each sublayer reads one combination of
    the streams (``read``, in words; the ``attn_read``/``mlp_read`` sites hold it) and writes its output into every
    stream with a weight, around a stream-mixing matrix (``attn`` and ``mlp``: ``Connection``). ``dynamic``: the
    weights are computed per token from the streams themselves (else they are parameters).

    After the last block, ``final`` (a path in the base model, and which output of it, as a site: (path, "in"|"out"))
    holds the combination the final norm reads (``final_norm``, a path in the base model; None where the combination
    is the model's last hidden state)."""

    streams: str
    flat: bool = False
    attn: Connection
    mlp: Connection
    read: str
    final: SiteSpec
    final_norm: str | None = None
    dynamic: bool = True

    def count(self, config) -> int:
        """How many streams the config gives the block state."""
        return int(getattr(config, self.streams))


@dataclass(frozen=True, kw_only=True)
class Experts:
    """A block's routed experts, fused in 3-D parameters of the module ``path``: ``gate_up_proj`` [experts, 2 ff, d]
    (gate rows, then up rows) and ``down_proj`` [experts, d, ff]; ``transposed`` stores them [experts, d, 2 ff] and
    [experts, ff, d] (x @ W); ``interleaved``: gate and up alternate column by column; ``biases``:
    ``gate_up_proj_bias`` and ``down_proj_bias``; ``gated`` False: an ``up_proj`` [experts, ff, d] in place of
    ``gate_up_proj``, the neuron's activation act_fn(up). A gated neuron's activation is the module's own
    ``_apply_gate`` of the fused pre-activations (transformers gives every fused experts module one: act_fn(gate) x up
    unless the family has its own, e.g. gpt-oss's clamped SwiGLU); stacked experts compute act_fn(gate) x up.

    How the module runs: transformers' fused experts call the experts implementation their config names (``run_with``
    swaps in another); ``stacked`` experts instead return every expert's output for every token, [experts x tokens, d]
    (0 where a token is not routed to the expert, its input being 0), and call no implementation."""

    path: str = "experts"
    transposed: bool = False
    interleaved: bool = False
    biases: bool = False
    gated: bool = True
    stacked: bool = False

    @staticmethod
    @contextmanager
    def run_with(modules: Sequence[nn.Module], name: str, forward: Callable[..., torch.Tensor]) -> Iterator[None]:
        """While open, the fused (not stacked) experts ``modules`` run ``forward(module, hidden_states, top_k_index,
        top_k_weights)``, registered under ``name`` among transformers' experts implementations: each module's config
        names the implementation it runs (transformers' private ``_experts_implementation``), set back on exit."""
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register(name, forward)
        configs = list({id(module.config): module.config for module in modules}.values())
        saved = [(config, config._experts_implementation) for config in configs]
        for config, _ in saved:
            config._experts_implementation = name
        try:
            yield
        finally:
            for config, implementation in saved:
                config._experts_implementation = implementation


@dataclass(frozen=True, kw_only=True)
class Mlp:
    """A dense MLP: ``path``, its module in the block ("" where its projections sit on the block itself: mlp_in is
    then the up projection's input and mlp_out the down projection's output), and in it the ``up``, ``gate`` (None: an
    ungated MLP) and ``down`` projections and ``act``, the activation module (or the function the MLP calls).
    ``fused``: ``up`` makes both, the gate in the first half of its outputs and up in the second (Phi-3's
    ``gate_up_proj``). ``out_at_down``: mlp_out is read at the down projection's output, where the block writes into
    the MLP module's output tensor in place. ``gate_scale``: the gate pre-activation is multiplied by this factor
    before the activation (mlp_act = act(mlp_gate x gate_scale) x mlp_up); ``down_scale``: the down projection's output
    is multiplied by this factor to give the MLP's (Falcon-H1's muP mlp_multipliers): mlp_raw is then the down
    projection's output, and mlp_out (what lands) it times the factor (``Adapter.landing``)."""

    path: str = "mlp"
    up: str = "up_proj"
    gate: str | None = "gate_proj"
    down: str = "down_proj"
    act: str | Callable[[torch.Tensor], torch.Tensor] = "act_fn"
    fused: bool = False
    out_at_down: bool = False
    gate_scale: Factor | None = None
    down_scale: Factor | None = None

    def __post_init__(self):
        if self.fused and self.gate is not None:
            raise ValueError("a fused MLP makes its gate in the up projection: it has no gate module")
        if self.gate_scale is not None and not self.gated:
            raise ValueError("an ungated MLP has no gate to scale")

    def part(self, name: str) -> str:
        """The block-relative path of the MLP's module ``name`` (a path in the MLP)."""
        return _join(self.path, name)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused

    def sites(self) -> dict[str, SiteSpec]:
        """The MLP's sites: its input, gate and up pre-activations, activations (the down projection's input) and
        output."""
        up, down = self.part(self.up), self.part(self.down)
        sites: dict[str, SiteSpec] = {"mlp_in": (self.path, "in") if self.path else (up, "in")}
        if self.fused:
            sites |= {"mlp_gate": (up, "out", (0, 2)), "mlp_up": (up, "out", (1, 2))}
        else:
            sites |= {"mlp_gate": (self.part(self.gate), "out")} if self.gate is not None else {}
            sites["mlp_up"] = (up, "out")
        sites["mlp_act"] = (down, "in")
        # Where the down projection's output is scaled after it, mlp_out is read there and times the scale.
        at_down = self.out_at_down or self.down_scale is not None
        sites["mlp_out"] = (self.path, "out") if self.path and not at_down else (down, "out")
        return sites


@dataclass(frozen=True, kw_only=True)
class Beside:
    """Routed experts beside the dense MLP in one block, each part behind its own norms, summed before the branch norm
    (Gemma-4's MoE block): the router reads resid_mid itself, the experts read ``norm`` of it, and

        mlp_raw = dense_norm(mlp(mlp_norm(resid_mid))) + routed_norm(experts(norm(resid_mid), router(resid_mid)))

    with mlp_out the branch norm of mlp_raw. The sites of the two parts: dense_raw (the dense MLP's output) and
    dense_out (its ``dense_norm``), moe_in (the experts' input), moe_raw (their weighted sum) and moe_out (its
    ``routed_norm``): mlp_raw = dense_out + moe_out."""

    norm: str
    dense_norm: str
    routed_norm: str


@dataclass(frozen=True, kw_only=True)
class Moe:
    """A sparse mixture-of-experts MLP: the block at ``block`` (in the decoder layer; "": the decoder layer holds the
    router and experts itself), its ``router`` and ``experts``, and a dense ``shared`` expert every token also goes
    through (its MLP, whose path is in the block; ``shared_gate``: a 1-output linear whose sigmoid scales it, Qwen's
    ``shared_expert_gate``; None: added as it is, times ``shared_scale``: Cohere-2-MoE averages the routed and the shared
    experts' outputs, 0.5 each). ``beside``: the experts sit beside the adapter's dense ``mlp``, each behind its own norms
    (``Beside``); the block is then the decoder layer ("").

    ``shared_beside``: the shared expert is no module of the block but its sibling in the decoder layer (its path is in
    the layer), and the MLP's output is the block's plus the shared expert's, a sum no module returns (Granite-4.0-H's
    ``shared_mlp`` beside ``block_sparse_moe``): mlp_out is then ``Summed``.

    ``latent``: the routed experts work in a latent of their own, (into, out of) it: two linears in the block
    (Nemotron-H's ``fc1_latent_proj``, ``fc2_latent_proj``). The experts read into(x), and their weighted sum lands
    through out of it: moe(x) = out(sum_e w_e expert_e(into(x))) (+ the shared expert), so an expert's down projection
    writes the latent, and its neuron reaches a residual dim through the out-projection's row for that dim."""

    router: Router = Router()
    experts: Experts = Experts()
    block: str = "mlp"
    shared: Mlp | None = None
    shared_gate: str | None = None
    shared_scale: float = 1.0
    shared_beside: bool = False
    latent: tuple[str, str] | None = None
    beside: Beside | None = None

    def __post_init__(self):
        if self.shared_beside and self.shared is None:
            raise ValueError("a shared expert beside the mixture of experts needs its MLP (shared)")

    def part(self, name: str) -> str:
        """The path in the decoder layer of the mixture's module ``name`` (a path in its block)."""
        return _join(self.block, name)

    def shared_part(self, name: str = "") -> str:
        """The path in the decoder layer of the shared expert's module ``name`` (a path in the shared MLP; "": the
        shared MLP itself), wherever the shared expert sits: in the block, or beside it."""
        return _join(*(() if self.shared_beside else (self.block,)), self.shared.path, name)

    def output(self) -> SiteSpec:
        """Where the MLP's output (mlp_out before any scale) is read: the block's output, or with the shared expert
        beside it, the sum of the two."""
        if not self.shared_beside:
            return (self.block, "out")
        return Summed((Part(path=self.block), Part(path=self.shared.path, projection=self.shared.down)))


@dataclass(frozen=True, kw_only=True)
class PerLayerInput:
    """A third branch that writes the stream after the MLP from an input the model hands each block (Gemma-4's
    per-layer embeddings: per token and block, a looked-up embedding mixed with a projection of the token's input
    embedding): ``gate`` reads the stream as the MLP left it (ple_in) and its activation ``act`` multiplies the
    per-layer input; ``projection`` maps the product back to the stream (its output is ple_raw where ``norm`` follows,
    else ple_out); ``norm`` norms it before it lands (ple_out)."""

    gate: str = "per_layer_input_gate"
    act: str = "act_fn"
    projection: str = "per_layer_projection"
    norm: str | None = "post_per_layer_input_norm"

    def sites(self) -> dict[str, SiteSpec]:
        """ple_in (the stream the gate reads), and ple_raw and ple_out (what lands), or ple_out alone without a norm."""
        sites: dict[str, SiteSpec] = {"ple_in": (self.gate, "in")}
        if self.norm is None:
            return sites | {"ple_out": (self.projection, "out")}
        return sites | {"ple_raw": (self.projection, "out"), "ple_out": (self.norm, "out")}


def layer_types(config, layer: int) -> str:
    """The kind of attention the config gives ``layer`` (``layer_types``: full, sliding, linear, conv...), or "" where
    the config does not vary it."""
    kinds = getattr(config, "layer_types", None)
    return str(kinds[layer]) if kinds and layer < len(kinds) else ""


@dataclass(frozen=True, kw_only=True)
class Adapter:
    """A family's block: where its modules are and how they are laid out; ``sites`` is derived from them."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # path of the block list in the base model (LlamaModel: "layers"), whatever head wraps it
    # The token mixer's module (attn_out is read at its output) and its output projection in it (attention's o_proj,
    # a convolution's out_proj; "": the module is the projection).
    attention: str = "self_attn"
    attention_out: str = "o_proj"
    # A token mixer's branch that is the sum of several modules run side by side on the block's normed input
    # (Falcon-H1's Mamba-2 scan and softmax attention): the parts, in call order, each with its factor; attn_out is
    # then their ``Summed`` output, and ``attention`` is the path of the part that is the mixer named by ``mixer``
    # (its probabilities, values and heads are read there). Empty: attn_out is ``attention``'s output alone.
    mixer_parts: tuple[Part, ...] = ()
    mlp: Mlp | None = None  # the dense MLP; None where the block's MLP is a mixture of experts (``moe``)
    # The MLP is a sparse mixture of experts (a variant gives the dense blocks their ``mlp``), or, with ``Moe.beside``,
    # experts beside the dense ``mlp``.
    moe: Moe | None = None
    # The block is its token mixer alone, with one norm and one residual add (Nemotron-H's Mamba and attention
    # blocks): it has neither ``mlp`` nor ``moe``, and no MLP sites. A block that is its MLP alone has ``mixer`` None.
    no_mlp: bool = False
    # The norm that makes mlp_in from the stream the MLP reads (resid_mid, or resid_in in parallel blocks); the first
    # of these paths the block has. Empty where the MLP reads the stream itself (reordered norms, post-LN blocks).
    mlp_norm: tuple[str, ...] = ()
    # Sandwich norms: the landed site -> the norm that sits between the sublayer's raw output and the residual.
    branch_norms: dict[str, str] = field(default_factory=dict)
    # The config attribute holding a number each branch's output is multiplied by before it lands (Granite's
    # residual_multiplier): attn_out and mlp_out are then the scaled outputs, what lands; attn_raw and mlp_raw the
    # sublayers' own. Both are read at the sublayer's output (``landing``).
    branch_scale: str | None = None
    # The config attribute holding a number the base model multiplies the token embeddings by before the first block
    # (Granite's embedding_multiplier): block 0's input holds the product, the embedding module's output does not.
    embedding_scale: str | None = None
    parallel: bool = False  # attention and MLP both read the block input: there is no resid_mid between them
    # Post-LN blocks: (the norm of resid_in + attn_out, whose output the MLP reads; the norm of the block's last
    # residual sum). Massive activations are detected in that sum (``stream``): the massive value may live only
    # there, never in the normed output.
    post_norms: tuple[str, str] | None = None
    # Projection classes that store their weight [in, out] (y = x @ W + b: GPT-2's Conv1D); nn.Linear stores
    # [out, in] (y = x @ W.T + b).
    in_out: tuple[type[nn.Module], ...] = ()
    flat_rows: bool = False  # MLP sites hold [batch x positions, width] rows, not [batch, positions, width]
    encoder: bool = False  # bidirectional (BERT-like): loaded with its masked-LM head, no perplexity
    when: Callable[[object], bool] | None = None  # this variant applies to a config when this says so
    notes: str = ""  # what the report should say about this family's blocks
    # The token mixer's kind (see MIXERS; None: the block has no token mixer, it is its MLP alone, and no attn_out);
    # where its value vectors are (None: not read, e.g. q, k, v fused per head in
    # a config-dependent layout); an output gate per head (gated attention: out = attention x sigmoid(gate));
    # a learned sink logit per head that joins the softmax (the parameter's path in the block).
    mixer: str | None = "attention"
    # Whether the output projection reads every head's output side by side, so that attn_out splits over the heads
    # (False: DeepSeek-V4's o_b_proj reads o_a_proj's projections of groups of heads).
    heads_at_out: bool = True
    values: Cut | None = None
    # Where each head's queries and keys are read, before the rotary positions turn them: the first of these paths the
    # block has (the output of a q/k norm where the family norms them per head or per projection, else of the
    # projection itself: [batch, positions, heads x head_dim] or [batch, positions, heads, head_dim]); () where they
    # are not read (q, k and v fused in one projection, latent attention).
    queries: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    gate: Cut | None = None
    sinks: str | None = None
    positions: bool = True  # whether the mixer sees positions (rotary or learned); a NoPE layer does not
    # The module (its path in the block) that picks the keys each query attends to: DeepSeek sparse attention's
    # indexer, whose output is the top-k key positions per query [batch, queries, k]; None where every key is seen.
    indexer: str | None = None
    # A branch after the MLP that writes a per-layer input into the stream (Gemma-4's per-layer embeddings).
    per_layer_input: PerLayerInput | None = None
    # A buffer (its path in the block) that multiplies the block's output, after every branch has landed (Gemma-4's
    # ``layer_scalar``): resid_out = scale x (resid_in + the branches). None: no such factor.
    output_scale: str | None = None
    # Encoders whose position ids start after the padding index (RoBERTa): how many positions that costs.
    position_offset: Callable[[object], int] = lambda config: 0
    variants: tuple[Variant, ...] = ()
    # Hyper-connections: the residual is several streams (None: one stream, as in every other family); with them the
    # sites where each sublayer reads its combination of the streams.
    hyper: HyperConnections | None = None
    attn_read: SiteSpec | None = None
    mlp_read: SiteSpec | None = None
    sites: dict[str, SiteSpec] = field(init=False)  # canonical site -> where it is read, from ``block_sites``
    # The adapter of a block per combination of the variants that apply there (``at``).
    _at: dict[tuple[bool, ...], Adapter] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.no_mlp:
            if self.mlp is not None or self.moe is not None or self.mixer is None:
                raise ValueError(f"{self.family}: a block without an MLP (no_mlp) has a token mixer and neither mlp nor moe")
        elif self.beside is not None:
            if self.mlp is None or "mlp_out" not in self.branch_norms:
                raise ValueError(f"{self.family}: experts beside the MLP (Moe.beside) need the dense mlp and the norm of "
                                 "their sum (branch_norms['mlp_out'])")
        elif (self.mlp is None) == (self.moe is None):
            which = "both" if self.mlp is not None else "neither"
            raise ValueError(f"{self.family}: a block has either a dense mlp or a mixture of experts (moe), not {which} "
                             "(a block that is its token mixer alone says no_mlp; experts beside the MLP, Moe.beside)")
        if self.branch_norms and self.branch_scale is not None:
            raise ValueError(f"{self.family}: a branch lands through its norm or times a scale, not both")
        if self.mixer is not None and self.mixer not in MIXERS:
            raise ValueError(f"{self.family}: mixer {self.mixer!r} is none of {', '.join(MIXERS)}")
        if self.mixer_parts and self.attention not in [part.path for part in self.mixer_parts]:
            raise ValueError(f"{self.family}: the mixer's parts hold no {self.attention!r} (attention)")
        object.__setattr__(self, "sites", block_sites(self))

    def at(self, config, layer: int) -> Adapter:
        """The adapter of block ``layer``: the family's, with the changes of every variant that applies there."""
        if not self.variants:
            return self
        applies = tuple(bool(v.when(config, layer)) for v in self.variants)
        if applies not in self._at:
            changes: dict[str, object] = {}
            for variant in (v for v, on in zip(self.variants, applies) if on):
                changes |= variant.changes
            self._at[applies] = dataclasses.replace(self, variants=(), **changes)
        return self._at[applies]

    def scale_of(self, model: nn.Module, layer: int) -> float:
        """The factor block ``layer`` multiplies its output by (``output_scale``), 1.0 where it has none."""
        path = self.at(text_config(model), layer).output_scale
        return float(self.blocks(model)[layer].get_buffer(path)) if path is not None else 1.0

    def writers(self, config, layer: int) -> tuple[str, ...]:
        """The sites of block ``layer``'s branches as they land in the stream, in the block's order: attn_out, mlp_out
        (those the block has: a block of one sublayer has one), and ple_out where a per-layer input writes it too."""
        here = self.at(config, layer)
        return tuple(site for site in BRANCHES if site in here.sites) + (("ple_out",) if here.per_layer_input is not None else ())

    def routers(self, config, layer: int) -> tuple[str, ...]:
        """Paths in block ``layer`` of the modules that route its tokens to experts (none in a dense block). They are
        no block projection: a quantization engine leaves them as they are (Llama-4's router is an ``nn.Linear`` whose
        forward returns scores and logits, which an engine's quantized linear would not)."""
        moe = self.at(config, layer).moe
        return (moe.part(moe.router.path),) if moe is not None else ()

    @property
    def beside(self) -> Beside | None:
        """How the experts sit beside the dense MLP (``Moe.beside``); None in every other block."""
        return self.moe.beside if self.moe is not None else None

    @property
    def router_site(self) -> str:
        """The site the router reads: the mixture's input (mlp_in), or resid_mid where the experts sit beside the MLP."""
        return "resid_mid" if self.beside is not None else "mlp_in"

    @property
    def expert_site(self) -> str:
        """The site the routed experts read: the mixture's input (mlp_in), or moe_in beside the MLP."""
        return "moe_in" if self.beside is not None else "mlp_in"

    @property
    def dense_site(self) -> str:
        """The site holding the dense MLP's own output, down(mlp_act): dense_raw beside experts, else mlp_out's raw."""
        return "dense_raw" if self.beside is not None else self.raw("mlp_out")

    @property
    def has_mlp(self) -> bool:
        """Whether the block has an MLP (dense or a mixture of experts)."""
        return not self.no_mlp

    @property
    def attn_proj(self) -> str | None:
        """The token mixer's output projection (its path in the block); None in a block without a token mixer."""
        return _join(self.attention, self.attention_out) if self.mixer is not None else None

    @property
    def mixer_projections(self) -> tuple[str, ...]:
        """Every projection that writes the token mixer's branch (paths in the block): its output projection, or
        each part's where the branch is a sum; () in a block without a token mixer."""
        if self.mixer is None:
            return ()
        return tuple(_join(part.path, part.projection) for part in self.mixer_parts) or (self.attn_proj,)

    def part_factor(self, config, site: str, path: str) -> float:
        """The factor the block multiplies module ``path``'s output by in the sum that is ``site`` (1 where the site
        is no sum): the share of a summed branch that ``path`` writes, before any branch scale."""
        spec = self.sites[site]
        if not isinstance(spec, Summed):
            return 1.0
        return next(factor for part, factor in zip(spec.parts, spec.factors(config)) if part.path == path)

    @property
    def mlp_up(self) -> str | None:
        """The dense MLP's up projection (gate and up where fused); None in a mixture-of-experts block."""
        return self.mlp.part(self.mlp.up) if self.mlp is not None else None

    @property
    def mlp_gate(self) -> str | None:
        """The projection that makes the dense MLP's gate (the up projection where fused); None where ungated."""
        if self.mlp is None or not self.mlp.gated:
            return None
        return self.mlp.part(self.mlp.up if self.mlp.fused else self.mlp.gate)

    @property
    def mlp_down(self) -> str | None:
        """The dense MLP's down projection; None in a mixture-of-experts block."""
        return self.mlp.part(self.mlp.down) if self.mlp is not None else None

    @property
    def act_fn(self) -> str | Callable[[torch.Tensor], torch.Tensor] | None:
        """The dense MLP's activation: its module's path in the block, or the function the MLP calls."""
        if self.mlp is None:
            return None
        return self.mlp.part(self.mlp.act) if isinstance(self.mlp.act, str) else self.mlp.act

    @property
    def gated(self) -> bool:
        return self.mlp is not None and self.mlp.gated

    @property
    def post_ln(self) -> bool:
        return self.post_norms is not None

    @property
    def stream(self) -> str:
        """The site massive activations are detected at: each block's output, or in post-LN blocks the residual sum
        that enters the block's last norm."""
        return "resid_sum" if self.post_ln else "resid_out"

    def streams(self, config) -> int:
        """How many residual streams the block state holds: 1 without hyper-connections."""
        return self.hyper.count(config) if self.hyper is not None else 1

    def mlp_norm_module(self, model: nn.Module, layer: int) -> tuple[str, nn.Module] | None:
        """(path, module) of the norm in front of the MLP, or None where the MLP reads the stream unnormed."""
        block = self.module(model, layer, "")
        path = next((p for p in self.at(text_config(model), layer).mlp_norm if _has_submodule(block, p)), None)
        return (path, block.get_submodule(path)) if path is not None else None

    def query_key_paths(self, model: nn.Module, layer: int) -> tuple[str, str] | None:
        """The paths in block ``layer`` of the modules whose outputs hold its queries and its keys (the first of
        ``queries`` and of ``keys`` the block has), or None where the adapter reads neither."""
        here = self.at(text_config(model), layer)
        block = self.module(model, layer, "")
        query = next((p for p in here.queries if _has_submodule(block, p)), None)
        key = next((p for p in here.keys if _has_submodule(block, p)), None)
        return (query, key) if query is not None and key is not None else None

    def activation(self, model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's activation function at block ``layer`` (its module, or the function the MLP calls), as it acts
        on mlp_gate (on mlp_up where ungated): times the MLP's ``gate_scale`` first where it has one."""
        here = self.at(text_config(model), layer)
        act = self.module(model, layer, here.act_fn) if isinstance(here.act_fn, str) else here.act_fn
        if here.mlp is None or here.mlp.gate_scale is None:
            return act
        return ScaledInput(act, factor_of(text_config(model), here.mlp.gate_scale))

    def reshapes(self, site: str) -> bool:
        """Whether what the branch ``site`` (attn_out, mlp_out) lands differs from the sublayer's own output: a branch
        norm or a branch scale sits between them (the MLP's ``down_scale`` is one of mlp_out)."""
        scaled = self.branch_scale is not None or (site == "mlp_out" and self.mlp is not None and self.mlp.down_scale is not None)
        return site in self.branch_norms or (scaled and site in BRANCHES)

    def raw(self, site: str) -> str:
        """The site holding a branch's own output before any norm or scale: ``mlp_raw`` behind a sandwich norm or a
        branch scale, else the site itself."""
        return site.replace("_out", "_raw") if self.reshapes(site) else site

    def landing(self, config, site: str) -> float:
        """The number the module output a site is read at (or the sum of its parts) is multiplied by to give the
        site's value: for a landed branch the branch scale, and for mlp_out the MLP's ``down_scale``; else 1."""
        if site not in BRANCHES:
            return 1.0
        factor = float(getattr(config, self.branch_scale)) if self.branch_scale is not None else 1.0
        if site == "mlp_out" and self.mlp is not None and self.mlp.down_scale is not None:
            factor *= factor_of(config, self.mlp.down_scale)
        return factor

    def embedding_factor(self, config) -> float:
        """The number the token embeddings are multiplied by before the first block (1 where the embedding module's
        output is block 0's input, or holds the scale itself, as Gemma's does)."""
        return float(getattr(config, self.embedding_scale)) if self.embedding_scale is not None else 1.0

    def layers_path(self, model: nn.Module) -> str:
        """The block list's path in ``model``: under the base model's prefix when a head wraps it."""
        prefix = getattr(model, "base_model_prefix", "")
        return f"{prefix}.{self.layers}" if prefix and isinstance(getattr(model, prefix, None), nn.Module) else self.layers

    def base(self, model: nn.Module) -> nn.Module:
        """The module that holds the block list (the base model: its embeddings, final norm and, with
        hyper-connections, the final read of the streams)."""
        path = self.layers_path(model)
        return model.get_submodule(path.rpartition(".")[0]) if "." in path else model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path(model))

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.get_submodule(path) if path else block

    def is_projection(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of the block's linear projections (nn.Linear, or a class of ``in_out``)."""
        return isinstance(module, (nn.Linear, *self.in_out))

    def is_in_out(self, module: nn.Module) -> bool:
        """Whether the projection stores its weight [in, out] (a class of ``in_out``)."""
        return isinstance(module, self.in_out)

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as [out_features, in_features] (a view: writes reach the model), whatever the
        storage."""
        return module.weight.T if self.is_in_out(module) else module.weight

    def stored_index(self, module: nn.Module, out_index: int, in_index: int) -> tuple[int, int]:
        """(row, col) of W[out_index, in_index] in the parameter as it is stored."""
        return (in_index, out_index) if self.is_in_out(module) else (out_index, in_index)

    def param_name(self, model: nn.Module, layer: int, path: str, parameter: str = "weight") -> str:
        """Full parameter name, as ``model.get_parameter`` takes it."""
        return f"{self.layers_path(model)}.{layer}.{path}.{parameter}"

    def input_rows(self, model: nn.Module, layer: int, site: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [d_mlp, d_model] weight (a view: writes reach the model) and bias of the projection that makes
        ``mlp_up`` or ``mlp_gate``, this site's rows only when the projection is fused."""
        here = self.at(text_config(model), layer)
        path = here.mlp_gate if site == "mlp_gate" else here.mlp_up
        module = self.module(model, layer, path)
        weight, bias = self.weight_out_in(module), bias_of(module)
        chunk = here.sites[site][2] if len(here.sites[site]) > 2 else None
        if chunk is not None:
            index, count = chunk
            size = weight.shape[0] // count
            weight = weight[index * size : (index + 1) * size]
            bias = bias[index * size : (index + 1) * size] if bias is not None else None
        return weight, bias


class ScaledInput(nn.Module):
    """An activation applied to its input times ``factor``: act(x x factor) (Falcon-H1's act(gate x gate_multiplier))."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], factor: float):
        super().__init__()
        self.act, self.factor = act, factor

    @property
    def name(self) -> str:
        """The activation's class name applied to its input times the factor, as a report names it: "SiLUActivation(0.75 x)"."""
        return f"{type(self.act).__name__}({self.factor:g} x)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x * self.factor)


def _join(*parts: str) -> str:
    """A module path from its parts ("" parts dropped: the block itself)."""
    return ".".join(part for part in parts if part)


def block_sites(adapter: Adapter) -> dict[str, SiteSpec]:
    """Every canonical site of the adapter's block, from its component tree:

    - resid_in and resid_out: the block's input and output;
    - attn_out: the mixer's output (the sum of its parts' where it has several, ``mixer_parts``), or where a branch
      norm follows it, that norm's output (the mixer's is attn_raw),
      or where a branch scale multiplies it, the mixer's output times the scale (the unscaled output is attn_raw);
      none in a block without a token mixer;
    - resid_mid: what the MLP's norm reads (the MLP's input where it has none), or in post-LN blocks the output of
      the norm after the attention sum (whose input is attn_sum); none in parallel blocks, nor in a block of one
      sublayer (its output is resid_in plus that sublayer's);
    - mlp_in, mlp_gate, mlp_up, mlp_act, mlp_out from the MLP (a mixture of experts: its block's input and output,
      plus the shared expert's output where that sits beside the block),
      mlp_out behind a branch norm or times a branch scale as attn_out is (mlp_raw before it); none in a block without
      an MLP;
    - resid_sum in post-LN blocks: the input of the block's last norm;
    - with experts beside the dense MLP (``Beside``): the MLP's sites are the dense MLP's, mlp_raw the input of the
      branch norm (the sum of the two parts), and dense_raw, dense_out, moe_in, moe_raw, moe_out the parts';
    - ple_in, ple_raw and ple_out where a per-layer input writes the stream after the MLP (``PerLayerInput``);
    - with hyper-connections: resid_mid is the streams the MLP's connection reads, and attn_read and mlp_read the
      combinations of the streams the two sublayers read (before their own norms)."""
    if adapter.mlp is not None:
        mlp = adapter.mlp.sites()
    elif adapter.moe is not None:
        mlp = {"mlp_in": (adapter.moe.block, "in"), "mlp_out": adapter.moe.output()}
    else:
        mlp = {}
    sites: dict[str, SiteSpec] = {"resid_in": ("", "in")}
    if adapter.mixer is not None:
        mixer = Summed(adapter.mixer_parts) if adapter.mixer_parts else (adapter.attention, "out")
        sites |= _landed(adapter, "attn_out", mixer)
    if adapter.post_norms is not None:
        sites |= {"attn_sum": (adapter.post_norms[0], "in"), "resid_mid": (adapter.post_norms[0], "out")}
    elif adapter.hyper is not None:
        sites |= {"attn_read": adapter.attn_read, "resid_mid": (adapter.hyper.mlp.path, "in"), "mlp_read": adapter.mlp_read}
    elif not adapter.parallel and mlp and adapter.mixer is not None:
        sites["resid_mid"] = (adapter.mlp_norm[0], "in") if adapter.mlp_norm else mlp["mlp_in"]
    if mlp:
        mlp_out = mlp.pop("mlp_out")
        if adapter.beside is not None:
            sites |= mlp | _beside(adapter, mlp_out)
        else:
            sites |= mlp | _landed(adapter, "mlp_out", mlp_out)
    if adapter.post_norms is not None:
        sites["resid_sum"] = (adapter.post_norms[1], "in")
    if adapter.per_layer_input is not None:
        sites |= adapter.per_layer_input.sites()
    sites["resid_out"] = ("", "out")
    return sites


def _landed(adapter: Adapter, branch: str, raw: SiteSpec) -> dict[str, SiteSpec]:
    """A branch's output as it lands in the residual: behind its branch norm where it has one, or the raw output
    itself, times the branch scale (``Adapter.landing``) where the block scales it; the raw output is then the
    branch's *_raw site."""
    if branch in adapter.branch_norms:
        return {adapter.raw(branch): raw, branch: (adapter.branch_norms[branch], "out")}
    if adapter.reshapes(branch):
        return {adapter.raw(branch): raw, branch: raw}
    return {branch: raw}


def _beside(adapter: Adapter, dense: SiteSpec) -> dict[str, SiteSpec]:
    """The sites of experts beside the dense MLP (``Beside``), whose output is ``dense``: each part before and after its
    own norm, the experts' input, and the branch norm's input (their sum, mlp_raw) and output (mlp_out)."""
    beside, experts, norm = adapter.beside, adapter.moe.part(adapter.moe.experts.path), adapter.branch_norms["mlp_out"]
    return {"dense_raw": dense, "dense_out": (beside.dense_norm, "out"), "moe_in": (beside.norm, "out"),
            "moe_raw": (experts, "out"), "moe_out": (beside.routed_norm, "out"), "mlp_raw": (norm, "in"),
            "mlp_out": (norm, "out")}


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


def bias_of(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
