"""Result dataclasses: what each analysis step found. Values are float32-or-wider Python numbers, blocks are 0-based."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .moe import MoeAttribution


@dataclass
class ModelInfo:
    name: str
    architecture: str
    family: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    gated: bool
    dtype: str
    device: str
    source: str | None = None
    stream: str = "resid_out"  # the site massive activations are detected in (resid_sum for post-LN blocks)
    notes: str = ""  # what the family's blocks do differently (parallel, sandwich norms, post-LN)  # what was loaded: a hub id, a path, or None for the embedded default


@dataclass
class CorpusInfo:
    """What was scanned: where the texts came from, how many texts, windows (forward passes) and real tokens, and
    the settings that read it again (``massact verify`` re-runs the scan from them)."""

    source: str
    texts: int
    windows: int
    tokens: int
    spec: dict


@dataclass
class Criterion:
    """An activation a is massive when |a| >= min_abs and |a| >= min_ratio x the median |a| of its hidden state."""

    min_abs: float = 100.0
    min_ratio: float = 1000.0
    median: str = "median |a| over every token of every text at that block's output"
    median_rel_error: float = 0.0


@dataclass
class Entry:
    """One activation: its signed value at (text, position, dim); ``token`` is the decoded token there."""

    value: float
    text: int
    position: int
    token: str
    dim: int


@dataclass
class LayerStats:
    """A block's residual output (block i = HF hidden_states[i+1], taken before any final norm)."""

    layer: int
    median: float
    ratio: float
    top: list[Entry]


@dataclass
class Massive:
    layer: int
    text: int
    position: int
    token: str
    dim: int
    value: float
    ratio: float


@dataclass
class DimSummary:
    """Where a massive dim lives: the block that first makes it massive, every block where it is, where it falls back."""

    dim: int
    born_at: int
    persists: list[int]
    removed_at: list[int]
    max_value: float
    tokens: list[str]


@dataclass
class HeadShare:
    head: int
    contribution: float
    share: float


@dataclass
class Place:
    """Where a massive activation is explained: block, text, position (with its token), dim, and birth or removal."""

    layer: int
    text: int
    position: int
    token: str
    dim: int
    role: str


@dataclass
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


@dataclass
class Origin(Place):
    """resid_out = resid_in + attn + mlp at (position, dim) of ``layer``; the writer is the branch that made the change.

    attn and mlp are what lands in the residual. In blocks with sandwich norms ``attn_raw``/``mlp_raw`` are the
    sublayer outputs before the branch norm and ``norm`` splits the writer's branch norm into its factors. In
    post-LN blocks resid_out is the residual sum before the block's last LayerNorm, resid_sum = resid_mid + mlp with
    resid_mid = LN(resid_in + attn), and ``norm`` says how that LayerNorm scales the value into the block output.

    ``cause`` at a removal: "value" when the value itself fell under the criterion, "median" when it would still be
    massive against the previous block's median (the rest of the hidden state grew, the value held).
    """

    writer: str
    resid_in: float
    attn: float
    mlp: float
    resid_out: float
    cause: str | None = None
    heads: list[HeadShare] | None = None
    attn_raw: float | None = None
    mlp_raw: float | None = None
    resid_mid: float | None = None
    norm: NormFactors | None = None


@dataclass
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


@dataclass
class NeuronActivation:
    neuron: int
    before: float
    after: float
    up: float | None
    product: float


@dataclass
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


@dataclass
class Anatomy(Place):
    checkpoints: list[Checkpoint]
    explosion_point: str
    activation_impact: ActivationImpact


@dataclass
class NeuronContribution:
    """contribution = activation x weight, the neuron's part of the output; share = contribution / output."""

    neuron: int
    activation: float
    weight: float
    contribution: float
    share: float


@dataclass
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


@dataclass
class WeightStats:
    matrix: str
    shape: list[int]
    max: float
    argmax: list[int]
    mean: float


@dataclass
class Attribution(Place):
    """output = sum_i activation_i x W_down[dim, i] + bias; ``error`` is the relative gap of that sum to the output.
    ``output`` is the MLP's own (raw) output; ``landed`` what reaches the residual when a norm sits between."""

    output: float
    bias: float
    error: float
    neurons: list[NeuronContribution]
    neurons_for_90pct: int
    super_weight: SuperWeight
    weights: list[WeightStats] = field(default_factory=list)
    landed: float | None = None


@dataclass
class ExpertAttribution(Place):
    """A massive value written by a mixture-of-experts MLP, split into the routed experts (router weight x expert
    output) and the neurons of the strongest expert; ``moe`` holds the numbers (see ``massact.analysis.moe``)."""

    moe: MoeAttribution


@dataclass
class Intervention:
    """One intervention's effect: the massive value at its birth block and at the last block it persisted in,
    and the perplexity of the evaluation text (ratio to the unmodified model)."""

    name: str
    target: str
    dim: int
    layer: int
    value_birth: float
    value_last: float
    still_massive: bool
    perplexity: float | None
    perplexity_ratio: float | None
    confirms: bool | None


@dataclass
class InputDependence:
    """The massive dim over many inputs at its birth block: its first-token value, and which tokens carry it."""

    dim: int
    layer: int
    inputs: int
    first_token_mean: float
    first_token_std: float
    first_token_massive: int
    carriers: list[list]  # [token, count] of positions where the dim is massive, most frequent first
    other_positions: int


@dataclass
class TokenShift:
    """A token's probability averaged over the evaluation positions, unmodified (``before``) and under an intervention."""

    token: str
    id: int
    before: float
    after: float


@dataclass
class OutputEffect:
    """What an intervention changes in the model's predictions over the evaluation positions (next tokens, or the
    masked tokens of an encoder): the mean KL(unmodified || intervened), the perplexity (exp of the masked-LM loss
    for an encoder) as a cross-check, the mean probability mass on stopwords and on punctuation before and after,
    and the tokens whose mean probability rises and falls most."""

    name: str
    target: str
    positions: int
    kl: float
    perplexity: float
    stopword_before: float
    stopword_after: float
    punctuation_before: float
    punctuation_after: float
    rises: list[TokenShift]
    falls: list[TokenShift]


@dataclass
class Verification:
    """``metric``: "perplexity", or for an encoder "masked-LM" (the perplexity fields then hold exp of the masked-LM
    loss over a fixed, seeded 15% of the evaluation tokens; ``eval_tokens`` counts the masked ones)."""

    baseline_perplexity: float
    eval_tokens: int
    eval_source: str
    interventions: list[Intervention]
    input_dependence: list[InputDependence]
    claims: list[str]
    metric: str = "perplexity"
    masked_lm_loss: float | None = None
    output_effects: list[OutputEffect] = field(default_factory=list)


@dataclass
class SinkToken:
    """A position the attention pass treats as a sink token, with the dims that make it one and why."""

    text: int
    position: int
    token: str
    dims: list[int]
    reason: str


@dataclass
class SinkIntervention:
    """The sink measured again with the massive values replaced (``label``: zero or mean) at ``blocks``: per block the
    sink rate, the mean attention on the sink tokens, and whether a block that had a sink still has one (None where
    it had none)."""

    name: str
    label: str
    blocks: list[int]
    rate: list[float]
    share: list[float]
    survives: list[bool | None]


@dataclass
class AttentionSinks:
    """Per block and head: the attention probability the queries put on the sink tokens (``share``; later queries
    in a causal model, every query in an encoder), against what a uniform spread over the visible tokens would put
    there (``uniform``). ``rate``: per block, the sink rate of Gu et al. 2024, the share of (text, head) pairs whose
    ``share`` exceeds ``epsilon``; a block has a sink (``sink_layers``) when the rate is at least 50%.
    ``value_ratio``: mean |v| of the sink tokens' value vectors / median |v| of the others; ``output_share``: |sink
    part of the head output| / |head output| (sums over queries); ``noop_heads``: per block, heads with >= 50% of
    their attention on the sink and a value ratio under 0.5. ``interventions``: the same pass with the massive
    values replaced; ``dependence``: whether the sink needs them, in words."""

    texts: int
    share: list[list[float]]
    uniform: list[list[float]]
    sink_layers: list[int]
    first_sink_layer: int | None
    birth_layer: int | None
    summary: str
    epsilon: float = 0.3
    causal: bool = True
    rule: str = ""
    tokens: list[SinkToken] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    overall_rate: float | None = None
    value_ratio: list[list[float]] | None = None
    output_share: list[list[float]] | None = None
    noop_heads: list[int] = field(default_factory=list)
    values: str = ""
    interventions: list[SinkIntervention] = field(default_factory=list)
    dependence: str = ""


@dataclass
class BirthState:
    """The whole hidden state where the strongest massive dim is born: |a| of block ``layer``'s resid_out for text
    ``text``, one row per token (4 significant digits), for the heat map."""

    layer: int
    text: int
    tokens: list[str]
    dims: list[int]
    magnitude: list[list[float]]


@dataclass
class LifelineStep:
    """One block of a massive dim's life at its main carrier (values at that text, position and dim).

    value = resid_in + attn + mlp (+ norm in post-LN blocks) is the detection stream: the block output, or in post-LN
    blocks the residual sum before the last LayerNorm, which then makes ``resid_out``. attn and mlp are what lands
    (after any branch norm). ``change`` is value minus the previous block's value (the embedding before block 0);
    ``writer`` the term that made most of it in its direction: attn, mlp, or norm (post-LN: both LayerNorms).
    ``median`` is the block's median |a| over the corpus; ``phase`` see ``Lifeline``.
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


@dataclass
class Phase:
    """Consecutive blocks of one phase and one writer, with the change they make together."""

    name: str
    first: int
    last: int
    writer: str
    change: float
    value_before: float
    value_after: float


@dataclass
class Lifeline:
    """The whole life of a massive dim at its main carrier, the (text, position) where it is largest.

    Phases, per block: ``precursor`` (before the birth block, a write of at least 10% of the largest value the dim
    reaches before birth, when that is at least min_abs: a smaller value of its own sign, written early),
    ``precursor erasure`` (before birth, taking at least 10% of it off), ``birth``, ``growth`` (after birth, adding at
    least 10% of the peak), ``erasure`` (taking at least 10% of the peak off), ``hold`` (neither, while the value
    stays above half its peak), ``after`` (what is left after the erasure). ``removed_at`` are the blocks where the
    scan stops calling it massive (``cause`` per block: "value" fell, or the "median" grew past it); ``erased_at`` the
    blocks that really take it off. ``error``: the largest relative gap of a block's terms to its value.
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


@dataclass
class SourcePart:
    """One upstream source's part of a pre-activation: at the massive position (``here``) and at the text's other
    positions (their mean and their largest value). ``difference`` = here - others_mean: how much of why the neuron
    is different here this source explains."""

    source: str
    layer: int | None
    site: str
    here: float
    others_mean: float
    others_max: float
    difference: float


@dataclass
class PreActivationSplit:
    """A neuron's pre-activation (``site``: mlp_gate or mlp_up) at the massive position split into its sources, which
    sum to ``value`` exactly given ``scale``, the MLP input norm's factor (1/rms or 1/std) at the position (``scale_others``:
    its mean elsewhere). ``error``: largest gap of the sum to the model's value, relative to its largest |value|.
    ``sources``: largest |difference| first."""

    site: str
    value: float
    others_mean: float
    others_max: float
    scale: float
    scale_others: float
    sources: list[SourcePart]
    error: float


@dataclass
class NeuronTrigger:
    """Why a top neuron of a writing block fires at the massive position: each of its pre-activations split."""

    layer: int
    neuron: int
    role: str
    splits: list[PreActivationSplit]


@dataclass
class ChainLink:
    """One step back from the massive value: a neuron (its pre-activation ``site`` at the position, ``value``, and its
    mean over the other positions), a head (``attends``: [position, token, probability] of its strongest keys), or the
    embedding that ends the chain. ``source`` is the source it belongs to and ``feeds`` its part of the next link's
    pre-activation at the position (``source_here`` / ``source_others``: the whole source's part here and elsewhere)."""

    depth: int
    kind: str
    layer: int | None
    index: int | None
    site: str | None
    value: float | None
    value_others: float | None
    source: str | None
    feeds: float | None
    source_here: float | None
    source_others: float | None
    attends: list[list] | None = None


@dataclass
class Carriers:
    """Token or position? Where the scan saw the dim massive (first positions: texts and their distinct tokens; other
    positions: their tokens), and two probes on the carrier's text at the peak block: another token put at the carrier's
    position (``swapped``: the value there) and the carrier token moved one position later (``moved``: its value there)."""

    texts: int
    first_position_texts: int
    first_tokens: list[list]
    other_positions: list[list]
    probe_layer: int
    swapped_token: str
    swapped: float
    swapped_massive: bool
    moved: float
    moved_massive: bool
    verdict: str
    summary: str


@dataclass
class QuantRow:
    """One quantization setting, measured: perplexity on the evaluation text (and its ratio to the float model) and
    the massive value at its birth and peak block on the probe (``kept_*``: as a fraction of the float value).

    ``method``: "rtn" (asymmetric min-max round-to-nearest of the block projections' weights), "gguf" (a llama.cpp
    block format through the gguf package's reference quantizer) or "activation" (int8 of every block projection's
    input). ``massive_error_share``: for activations, the share of the summed squared quantization error that falls
    on the massive tokens."""

    method: str
    setting: str
    variant: str
    perplexity: float
    perplexity_ratio: float
    value_birth: float
    value_peak: float
    kept_birth: float
    kept_peak: float
    massive_error_share: float | None = None
    seconds: float = 0.0


@dataclass
class Quantization:
    """The quantization sweep: the float baseline, what was quantized and held out, and one row per setting."""

    baseline_perplexity: float
    eval_tokens: int
    eval_source: str
    dim: int
    birth_layer: int
    peak_layer: int
    position: int
    value_birth: float
    value_peak: float
    matrices: int
    parameters: int
    super_weights: list[list]  # [parameter, index as stored, value], each held out in the "held out" variants
    massive_tokens: int  # tokens of the evaluation text that carry a massive activation (kept in float where said)
    grid: str
    clip_z: float
    rows: list[QuantRow]
    seconds: float
    notes: list[str]


@dataclass
class BlockHeadroom:
    """A block's largest |a| (``dim``), float16's largest finite value over it (``headroom``: below 1 it overflows)."""

    layer: int
    max_abs: float
    dim: int
    headroom: float
    overflows: bool


@dataclass
class Precision:
    """What the scan's values mean for half precision: per-block headroom against float16's 65,504, the entries
    above it, and the rounding step of bfloat16 and float16 at the largest massive value (the gap between two
    neighbouring representable numbers there)."""

    float16_max: float
    blocks: list[BlockHeadroom]
    overflows: list[list]  # [block, dim, largest value] for each block and dim with a listed |a| > float16_max
    largest: float
    largest_layer: int
    largest_dim: int
    headroom: float
    bfloat16_step: float
    float16_step: float
    summary: str


@dataclass
class Patch:
    """A top source of the writing neuron's pre-activation replaced at the massive position (by its mean over the
    text's other positions, or by zero), the rest of the model left to run. ``direct``: the change of the pre-activation
    through that source alone, with every norm factor held (its direct contribution); ``total``: the change the model
    really shows, through every later block too. The massive value at the birth and peak blocks under the patch, and
    whether it is still massive at either."""

    source: str
    layer: int | None
    site: str
    replacement: str
    direct: float
    total: float
    pre_activation: float
    value_birth: float
    value_peak: float
    still_massive: bool


@dataclass
class Trigger:
    """Why a massive dim is written at its carrier and nowhere else: the writing neurons' pre-activations split into
    sources, the chain from the token to the value (depth-limited), and the token-or-position evidence."""

    dim: int
    text: int
    position: int
    token: str
    neurons: list[NeuronTrigger]
    chain: list[ChainLink]
    carriers: Carriers | None
    warnings: list[str] = field(default_factory=list)
    patching: list[Patch] = field(default_factory=list)


@dataclass
class SuperWeightStep:
    """One step of Yu et al.'s iterative search for a dim's super weights: with every earlier step's weight still
    zeroed, the top contributor of what is left at the birth block (its ``neuron``, at the main carrier) gives the next
    super weight; it is zeroed too and the dim is measured again. ``value_birth`` / ``value_peak``: the massive value
    left at the birth and peak blocks; ``still_massive`` at either; the perplexity of the evaluation text with every
    weight so far zeroed. ``weight.rank`` is its rank by |w| in the unmodified matrix."""

    dim: int
    layer: int
    step: int
    neuron: int
    weight: SuperWeight
    value_birth: float
    value_peak: float
    still_massive: bool
    perplexity: float | None
    perplexity_ratio: float | None


@dataclass
class Report:
    model: ModelInfo
    corpus: CorpusInfo
    texts: dict[int, str]  # by window index: only the windows the report points at, and the first few
    tokens: dict[int, list[str]]
    criterion: Criterion
    layers: list[LayerStats]
    massive: list[Massive]
    dims: list[DimSummary]
    origin: list[Origin]
    anatomy: list[Anatomy]
    attribution: list[Attribution]
    conclusion: list[str]
    warnings: list[str]
    versions: dict[str, str]
    verification: Verification | None = None
    attention: AttentionSinks | None = None
    birth_state: BirthState | None = None
    experts: list[ExpertAttribution] = field(default_factory=list)
    lifeline: list[Lifeline] = field(default_factory=list)
    trigger: list[Trigger] = field(default_factory=list)
    super_weights: list[SuperWeightStep] = field(default_factory=list)
    precision: Precision | None = None
    quantization: Quantization | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(value):
    """JSON has no inf or nan (float16 overflow makes them): write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
