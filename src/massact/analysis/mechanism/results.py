"""What the mechanism stage finds: origin (which sublayer writes), MLP anatomy, neuron attribution and super weight, norm
factors, birth state, lifeline, a mixture of experts' split into experts and its super experts; and the words a lifeline
and a role can be (``PHASES``, ``WRITERS``, ``ROLES``)."""

from __future__ import annotations

from dataclasses import dataclass, field

# What a lifeline step names as the writer of its change: a branch (attention, MLP, a per-layer input), the norms
# (post-LN), the block's output scale, or a hyper-connection block's stream-mixing weights ("mix").
WRITERS = ("attn", "mlp", "norm", "ple", "scale", "mix")
BRANCHES = ("attn", "mlp", "ple")  # what the origin names as the writer: the branch that made the block's change
# The phases a block's step can have; the first six name a block that writes or erases the dim (``WRITING``).
# "reversal": after birth, the value is massive again with the other sign (an eraser went through zero and past the
# threshold); the phases after it follow the new sign.
PHASES = ("precursor", "precursor erasure", "birth", "growth", "erasure", "reversal", "hold", "after")
WRITING = PHASES[:6]
ROLES = WRITING + ("removal",)  # what an event (and the origin, anatomy and attribution it makes) can be


@dataclass(kw_only=True)
class HeadShare:
    head: int
    contribution: float
    share: float



@dataclass(kw_only=True)
class Place:
    """Where a massive activation is explained: block, text, position (with its token), dim, and birth or removal."""

    layer: int
    text: int
    position: int
    token: str
    dim: int
    role: str



@dataclass(kw_only=True)
class NormFactors:
    """How a norm turns a raw value into what lands: landed = normalization x centered x gain + bias, at one dim.

    ``centered`` is raw minus the vector's mean for a LayerNorm (raw itself for an RMSNorm); ``normalization`` is
    1 / rms (or 1 / std) of the whole vector; ``gain`` is the effective per-dim gain (Gemma's 1 + weight), ``weight``
    the stored entry ``parameter[dim]``. ``gain_ratio`` = |gain| / median |gain| over all dims: far above 1, the norm
    itself amplifies this dim (``amplifier``), and its weight entry acts as a super weight. ``error``: the product
    against the value the model computed (relative).
    """

    parameter: str
    dim: int
    raw: float
    centered: float
    normalization: float
    gain: float
    weight: float
    bias: float
    landed: float
    error: float
    typical_gain: float
    gain_ratio: float
    amplifier: bool



@dataclass(kw_only=True)
class Origin(Place):
    """resid_out = resid_in + attn + mlp at (position, dim) of ``layer``; the writer is the branch that made the change.

    attn and mlp are what lands in the residual; None where the block has no such branch (a block of one sublayer:
    a token mixer alone, or an MLP alone). In blocks with sandwich norms ``attn_raw``/``mlp_raw`` are the
    sublayer outputs before the branch norm and ``norm`` splits the writer's branch norm into its factors; in blocks
    that scale each branch before it lands (Granite's residual multiplier) they are the outputs before the scale. In
    post-LN blocks resid_out is the residual sum before the block's last LayerNorm, resid_sum = resid_mid + mlp with
    resid_mid = LN(resid_in + attn), and ``norm`` says how that LayerNorm scales the value into the block output.

    ``cause`` at a removal: "value" when the value itself fell under the criterion, "median" when it would still be
    massive against the previous block's median (the rest of the hidden state grew, the value held).

    Where a per-layer input writes the stream after the MLP (Gemma-4): ``ple`` is what it lands (``ple_raw`` before its
    norm), a third writer (writer "ple"), and ``scale`` the block's output scale: resid_out = scale x (resid_in + attn
    + mlp + ple).

    Where routed experts sit beside the dense MLP (Gemma-4's MoE block), mlp_raw is the sum of the two parts, each
    after its own norm: ``mlp_dense`` (the dense MLP's) and ``mlp_routed`` (the experts'); ``norm`` is then the norm of
    that sum.
    """

    writer: str
    resid_in: float
    attn: float | None
    mlp: float | None
    resid_out: float
    cause: str | None = None
    heads: list[HeadShare] | None = None
    attn_raw: float | None = None
    mlp_raw: float | None = None
    resid_mid: float | None = None
    norm: NormFactors | None = None
    ple: float | None = None
    ple_raw: float | None = None
    scale: float | None = None
    mlp_dense: float | None = None
    mlp_routed: float | None = None



@dataclass(kw_only=True)
class Checkpoint:
    """One MLP checkpoint at the position: |v| statistics over its ``size`` entries.

    ``change`` is max minus the max of ``previous``; ``jump`` is ratio over the previous ratio (how much sharper).
    """

    name: str
    size: int
    max: float
    argmax: int
    value: float
    median: float
    ratio: float
    previous: str | None
    change: float | None
    change_pct: float | None
    jump: float | None



@dataclass(kw_only=True)
class NeuronActivation:
    neuron: int
    before: float
    after: float
    up: float | None
    product: float



@dataclass(kw_only=True)
class ActivationImpact:
    """What the activation function does to the pre-activation (the gate in a gated MLP), over all neurons.

    suppressed: |after| < 10% of |before|; flipped: the sign changed; kept_mass: sum |after| / sum |before|.
    """

    function: str
    neurons: int
    suppressed: int
    flipped: int
    kept_mass: float
    median_before: float
    median_after: float
    top: list[NeuronActivation]



@dataclass(kw_only=True)
class Anatomy(Place):
    checkpoints: list[Checkpoint]
    explosion_point: str
    activation_impact: ActivationImpact



@dataclass(kw_only=True)
class NeuronContribution:
    """contribution = activation x weight, the neuron's part of the output; share = contribution / output."""

    neuron: int
    activation: float
    weight: float
    contribution: float
    share: float



@dataclass(kw_only=True)
class SuperWeight:
    """W_down[dim, neuron] of the top neuron, located as stored: ``get_parameter(matrix)[row, col]`` is ``value``.

    rank: 1 + how many entries of the matrix are larger in |w|.
    """

    matrix: str
    row: int
    col: int
    value: float
    rank: int
    entries: int



@dataclass(kw_only=True)
class WeightStats:
    matrix: str
    shape: list[int]
    max: float
    argmax: list[int]
    mean: float



@dataclass(kw_only=True)
class Attribution(Place):
    """output = sum_i activation_i x W_down[dim, i] + bias; ``error`` is the relative gap of that sum to the output.
    ``output`` is the MLP's own (raw) output; ``landed`` what reaches the residual when a norm or a branch scale sits
    between. With hyper-connections, ``stream`` is the stream the value is followed in and ``write`` the MLP's write
    weight into it (w_mlp[stream]): the stream gets ``landed`` = write x output, the write weight the amplifier between
    the neurons' sum and the stream, as a norm's gain is. Beside routed experts, ``norm`` splits the dense MLP's own norm
    (output -> its part of mlp_raw) into its factors; the branch norm of the sum is the origin's."""

    output: float
    bias: float
    error: float
    neurons: list[NeuronContribution]
    neurons_for_90pct: int
    super_weight: SuperWeight
    weights: list[WeightStats] = field(default_factory=list)
    landed: float | None = None
    stream: str = ""
    write: float | None = None
    norm: NormFactors | None = None



@dataclass(kw_only=True)
class ExpertAttribution(Place):
    """A massive value written by a mixture-of-experts MLP, split into the routed experts (router weight x expert
    output) and the neurons of the strongest expert; ``moe`` holds the numbers (see ``massact.capture.routing``). With
    hyper-connections, ``stream`` is the stream the value is followed in, ``write`` the MLP's write weight into it
    (w_mlp[stream]) and ``landed`` = write x the block's output at the dim: what the stream gets (the experts' shares
    are of the output). Experts beside a dense MLP: ``norm`` splits their own norm (their weighted sum -> its part of
    mlp_raw) into its factors; the branch norm of the sum is the origin's."""

    moe: MoeAttribution
    stream: str = ""
    write: float | None = None
    landed: float | None = None
    norm: NormFactors | None = None



@dataclass(kw_only=True)
class BirthState:
    """The whole hidden state where the strongest massive dim is born: |a| of block ``layer``'s resid_out for text
    ``text``, one row per token (4 significant digits), for the heat map."""

    layer: int
    text: int
    tokens: list[str]
    dims: list[int]
    magnitude: list[list[float]]



@dataclass(kw_only=True)
class TokenValues:
    """The token view's numbers: each massive dim's value in the detection stream at every block and every token of
    a few of the report's texts (3 significant digits). ``values[t][d][block][position]`` is dim ``dims[d]`` in text
    ``texts[t]`` (its tokens are the report's ``tokens[texts[t]]``, cut to ``len(values[t][d][0])``). With
    hyper-connections dim ``dims[d]`` is read in stream ``streams[d]`` of the block output, the one its lifeline follows."""

    dims: list[int]
    texts: list[int]
    values: list[list[list[list[float]]]]
    streams: list[str] = field(default_factory=list)



@dataclass(kw_only=True)
class LifelineStep:
    """One block of a massive dim's life at its main carrier (values at that text, position and dim).

    value = resid_in + attn + mlp (+ norm in post-LN blocks) is the detection stream: the block output, or in post-LN
    blocks the residual sum before the last LayerNorm, which then makes ``resid_out``. attn and mlp are what lands
    (after any branch norm), 0 where the block has no such branch (``model.blocks`` says which blocks are one
    sublayer). ``change`` is value minus the previous block's value (the embedding before block 0);
    ``writer`` the term that made most of it in its direction: attn, mlp, or norm (post-LN: both LayerNorms).
    ``median`` is the block's median |a| over the corpus; ``phase`` see ``Lifeline``. Where a per-layer input writes
    the stream (Gemma-4): ``ple``, what it lands (writer "ple"), and ``scale``, the block's output scale: value =
    scale x (resid_in + attn + mlp + ple); what the scale changes is writer "scale".
    """

    layer: int
    resid_in: float
    attn: float
    mlp: float
    value: float
    resid_out: float
    change: float
    writer: str
    median: float
    massive: bool
    phase: str
    norm: float | None = None
    ple: float | None = None
    scale: float | None = None
    # With hyper-connections (the lifeline follows one stream): what the mixing weights change of the stream's value
    # (carried from every input stream, minus the stream's own input value); attn and mlp are then the sublayers'
    # outputs times their weights into this stream.
    mix: float | None = None



@dataclass(kw_only=True)
class Phase:
    """Consecutive blocks of one phase and one writer, with the change they make together."""

    name: str
    first: int
    last: int
    writer: str
    change: float
    value_before: float
    value_after: float



@dataclass(kw_only=True)
class Lifeline:
    """The whole life of a massive dim at its main carrier, the (text, position) where it is largest.

    Phases, per block: ``precursor`` (before the birth block, a write of at least 10% of the largest value the dim
    reaches before birth, when that is at least min_abs: a smaller value of its own sign, written early),
    ``precursor erasure`` (before birth, taking at least 10% of it off), ``birth``, ``growth`` (after birth, adding at
    least 10% of the peak), ``erasure`` (taking at least 10% of the peak off; it may overshoot through zero),
    ``reversal`` (massive again with the other sign: the phases after it follow that sign), ``hold`` (neither, while
    the value stays above half its peak), ``after`` (what is left after the erasure). ``sign`` is the value's sign
    where it is first massive at this carrier, and ``peak`` its largest value in that sign from birth on.
    ``removed_at`` are the blocks where the scan stops calling it massive (``cause`` per block: "value" fell, or the
    "median" grew past it); ``erased_at`` the blocks that really take it off. ``error``: the largest relative gap of a
    block's terms to its value.
    """

    dim: int
    text: int
    position: int
    token: str
    sign: int
    born_at: int
    peak: float
    peak_layer: int
    precursor: float
    precursor_layer: int | None
    steps: list[LifelineStep]
    phases: list[Phase]
    removed_at: list[int]
    removal_causes: list[str]
    erased_at: list[int]
    embedding: float
    error: float
    stream: str = ""  # with hyper-connections: the stream followed (the main carrier's)


@dataclass(kw_only=True)
class ExpertNeuron:
    """One neuron of one expert at ``dim``: gate and up are its pre-activations, activation = act(gate) x up (or the
    expert's own gate function), weight = W_down[e][dim, neuron] (latent experts: W_out[dim] . W_down[e][:, neuron],
    what the neuron writes into dim through the latent out-projection); contribution = router_weight x activation x
    weight (its part of the MoE output; Llama-4 scales the input instead); share = contribution / output."""

    neuron: int
    gate: float
    up: float
    activation: float
    weight: float
    contribution: float
    share: float


@dataclass(kw_only=True)
class ExpertContribution:
    """One expert's part of the MoE output at ``dim``: contribution = router_weight x output, share = contribution /
    the MoE output. ``expert`` is None for a shared expert: its router_logit is its gate's logit (shared_expert_gate .
    x) and its router_prob and router_weight sigmoid of it, or 1 where it has no gate. For a routed expert router_prob
    is its score (softmax probability over all experts, or sigmoid) and router_weight the weight the block applies.

    ``neurons``: the ``top`` neurons by |contribution|; all neurons together sum to ``contribution`` (``neuron_error``
    is the relative gap of that full sum, float64).
    """

    expert: int | None
    router_logit: float
    router_prob: float
    router_weight: float
    output: float
    contribution: float
    share: float
    neurons: list[ExpertNeuron] = field(default_factory=list)
    neuron_error: float = 0.0


@dataclass(kw_only=True)
class ExpertSuperWeight:
    """W_down[dim, neuron] of the top neuron of the top expert, located as stored: ``model.get_parameter(matrix)
    [tuple(index)]`` is ``value`` (index [expert, dim, neuron] in fused experts stored [E, d_model, d_mlp], [expert,
    neuron, dim] stored transposed, [dim, neuron] in a shared expert's ``down_proj.weight``). Latent experts' down
    projection writes the latent: the index is [expert, latent unit, neuron], the unit l on the neuron's largest path
    into dim (|W_out[dim, l] x W_down[e][l, neuron]|), and ``dim`` stays the residual dim. Reports of earlier
    versions name the matrix relative to the block's MLP (``experts.down_proj``).

    rank: 1 + how many entries of the whole stored parameter (all experts) are larger in |w|; entries: its size.
    """

    matrix: str
    index: list[int]
    expert: int | None
    dim: int
    neuron: int
    value: float
    rank: int
    entries: int


@dataclass(kw_only=True)
class MoeAttribution:
    """The MoE block's output at ``dim`` for one token, split into experts.

    output: the sum of every expert's contribution (float64), plus ``bias``, the latent out-projection's bias at dim
    (latent experts: their weighted sum passes through it once; 0 otherwise); actual: the block's own output there
    (calling the block on the token); error: |output - actual| / |actual|. ``experts`` are the routed experts the router selected, by
    router weight, highest first; ``shared_expert`` the shared expert (None where there is none). ``top_expert`` is the
    expert with the largest |contribution| (None when that is the shared expert); ``neurons`` are its top neurons and
    ``super_weight`` its top neuron's down-projection entry. ``gated``: that expert's neurons are gated (act(gate) x
    up); else their activation is act(up), and each neuron's ``gate`` holds its up pre-activation, the only one.
    """

    dim: int
    family: str
    output: float
    actual: float
    error: float
    experts: list[ExpertContribution]
    shared_expert: ExpertContribution | None
    top_expert: int | None
    neurons: list[ExpertNeuron]
    super_weight: ExpertSuperWeight
    gated: bool = True
    bias: float = 0.0


@dataclass(kw_only=True)
class SuperExpert:
    """An expert of block ``layer`` whose largest |output| over the corpus (before its router weight) is
    ``max_output``."""

    layer: int
    expert: int
    max_output: float


@dataclass(kw_only=True)
class SuperExpertRule:
    """The rule's three numbers (settings ``super_expert_quantile``, ``_fraction``, ``_depth``) and the threshold they
    gave: max(the quantile of all maxima, fraction x the largest), in blocks before depth x the block count."""

    quantile: float
    fraction: float
    depth: float
    threshold: float
    last_block: int


@dataclass(kw_only=True)
class ExpertPruning:
    """The model with ``pruned`` experts ([block, expert] pairs) never routed to (the router chooses among the
    others; a softmax renormalises over them): ``kind`` "super" (the super experts) or "random" (as many experts of the
    same blocks, chosen with a fixed seed among the others). ``perplexity`` on the evaluation text (and its ratio to
    the unmodified model's); ``massive_dims``: the report's massive dims still massive at their blocks and carriers;
    per block, the mean attention on the sink tokens before and after (``sink_before``, ``sink_after``; null where a
    block has no softmax attention) and ``sink_decay`` = 1 - after / before, summed over the blocks that had a sink
    (every softmax block where none had one): the paper's attention-sink decay."""

    kind: str
    pruned: list[list[int]]
    perplexity: float | None
    perplexity_ratio: float | None
    massive_dims: list[int]
    sink_decay: float | None = None
    sink_before: list[float] = field(default_factory=list)
    sink_after: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class SuperExperts:
    """``found``: the super experts by the rule, largest first; ``profile``: every (block, expert) maximum [blocks,
    experts] (null for a dense block or an expert never routed to); ``shared``: per block the shared expert's maximum
    (null without one), listed apart (what pruning them does is the causal stage's, ``Causal.expert_pruning``)."""

    found: list[SuperExpert]
    profile: list[list[float]]
    shared: list[float]
    rule: SuperExpertRule


@dataclass(kw_only=True, slots=True)
class Mechanism:
    """How each massive dim is written: its ``lifelines`` over every block, then at each block they name the writing
    sublayer (``origin``), the MLP's anatomy and neurons (``attribution``, or a mixture's ``experts``), a mixture of
    experts' super experts (Su et al. 2025; None for a dense model), the birth block's state on the carrier's text
    and each dim at every block and token (``token_values``: the HTML page's token view)."""

    lifelines: list[Lifeline]
    origin: list[Origin]
    anatomy: list[Anatomy]
    attribution: list[Attribution]
    experts: list[ExpertAttribution]
    super_experts: SuperExperts | None
    birth_state: BirthState | None
    token_values: TokenValues | None
    streams: list[StreamOrigin] = field(default_factory=list)  # with hyper-connections: each written block's stream origin


@dataclass(kw_only=True)
class StreamTerm:
    """One term of a hyper-connection stream's value at one dim (``massact.analysis.mechanism.streams``): ``source``
    "s0", "s1", ...: that input stream carried by the mixing weights, ``weight`` = (m_attn m_mlp)[source, stream];
    "attn" or "mlp": the sublayer's output through its write weight (the attention's then mixed by the MLP's
    connection). ``input`` is the source's value at the dim, ``value`` = weight x input."""

    source: str
    weight: float
    input: float
    value: float


@dataclass(kw_only=True)
class StreamOrigin:
    """Stream ``stream``'s ``value`` at ``dim`` of block ``layer``'s output (text, position), split into ``terms`` that
    add up to it (``error``: their relative gap). ``carrier``: the term with the largest share in the value's
    direction; ``role``: "carry" (the mixing weight keeps the stream's own value), "move" (it brings the value in from
    another stream), "write" (a sublayer writes it) or "amplifier" (a sublayer writes it through a write weight far
    above the block's typical one). ``heads``: where the attention writes it, its output at the dim (the "attn" term's
    input, before the write weight) split over its heads, largest |contribution| first (None where it does not, or
    where its output projection does not read the heads side by side)."""

    layer: int
    dim: int
    text: int
    position: int
    stream: str
    value: float
    terms: list[StreamTerm]
    carrier: str
    role: str
    error: float
    heads: list[HeadShare] | None = None
