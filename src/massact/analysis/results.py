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
class Verification:
    baseline_perplexity: float
    eval_tokens: int
    eval_source: str
    interventions: list[Intervention]
    input_dependence: list[InputDependence]
    claims: list[str]


@dataclass
class AttentionSinks:
    """Per block and head: the attention probability later queries put on the massive-activation tokens
    (``share``), against what a uniform spread over the visible tokens would put there (``uniform``)."""

    texts: int
    share: list[list[float]]
    uniform: list[list[float]]
    sink_layers: list[int]
    first_sink_layer: int | None
    birth_layer: int | None
    summary: str


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
