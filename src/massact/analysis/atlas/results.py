"""What an atlas holds (atlas.json): one row per model, its architecture beside what its report measured, and the
sentences the rows support, each with the rows it rests on."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models.architecture import Architecture


@dataclass(kw_only=True)
class AtlasDim:
    """A massive dim of one model: its largest value over the texts (signed), the block where it is born, and the
    tokens that carry it (as the report lists them)."""

    dim: int
    value: float
    born_at: int
    tokens: list[str]


@dataclass(kw_only=True)
class Row:
    """One model of the atlas: ``model`` as the atlas was given it, ``report`` its report's folder (in the atlas's
    folder), its ``architecture`` (read from the adapter), whether its scan read the weights block by block
    (``streamed``: a model larger than the memory limit, not verified, its attention columns None), and what its
    report measured.

    Detection: the massive ``dims``; ``top``, the largest |a| of any block's output, at block ``top_block``, whose
    median |a| is ``median`` (``ratio`` = top / median). The lead dim (the dim of the largest massive value): where it
    is born (``birth``, and ``birth_depth``, the block over the last block: 0 the first, 1 the last), the branch that
    writes it there (``writer``), its top neuron (``expert``: the expert that neuron is in, in a mixture of experts)
    and that neuron's share of the write, the super weight (``matrix[index]`` as stored) and its value, and the blocks
    that erase it (``erased_at``: empty where none does, None where the lead dim's lifeline was not measured). These
    are None where nothing is massive.

    Attention, measured only where the scan was verified (None where it was not, or where the model has no softmax
    attention): ``sink_rate``, the share of (text, head) pairs over every block whose attention on the sink tokens
    passes epsilon; ``has_sink``, whether some block has a sink (a rate of at least a half), the first at
    ``first_sink``; ``sink_share``, the mean attention on the sink tokens over the blocks and heads (the tokens at
    ``sink_positions``: position 0 is the first token); ``gate_sink`` and ``gate_other``, gated attention's mean gate
    at the sink tokens and elsewhere; ``learned_sink``, the mean attention mass a learned sink logit takes; and with
    the massive values set to zero, ``sink_kept`` of the ``sink_reached`` sink blocks after the birth keep their sink
    (``sink_survives``: at least half of them do).

    ``headroom``: float16's largest value over the largest |a| (below 1, float16 overflows). ``super_experts``:
    [block, expert] of each super expert (None for a dense model).

    The compression valley (None where the report has none): ``valley``, the block where the entropy of the token
    representations is lowest, ``valley_depth`` its relative depth, ``valley_from_birth`` = valley - birth (None
    without a massive value); ``valley_drop``, how far the entropy falls into the valley from the highest block before
    it, and ``valley_drop_without``, the same for the curve without the massive tokens.

    The queries and keys (the report's Q/K section; None where it has none): ``qk_ratio``, the largest max/mean L2
    norm of a dim over any query or key head (a dim is massive at 5); ``qk_band``, that head's top dim's rotary band
    (None where it is not turned); ``qk_heads``, the share of the query and key heads with a massive dim; with the
    disruption test, perplexity with the massive Q/K dims zeroed over the unmodified one (``qk_perplexity``) and the
    same for the control (``qk_control``).

    The curves: per block, top / median (``ratios``), the sink rate (``sink_rates``, NaN at a block without softmax
    attention; None where not measured), the normalized entropy (``entropies``; None where not measured) and the
    largest max/mean over its query and key heads (``qk_ratios``, NaN at a block not measured)."""

    model: str
    report: str
    architecture: Architecture
    verified: bool
    streamed: bool = False
    dims: list[AtlasDim]
    top: float
    top_block: int
    median: float
    ratio: float
    lead: int | None = None
    birth: int | None = None
    birth_depth: float | None = None
    writer: str | None = None
    neuron: int | None = None
    expert: int | None = None
    neuron_share: float | None = None
    super_weight: str | None = None
    super_weight_value: float | None = None
    erased_at: list[int] | None = None
    sink_rate: float | None = None
    has_sink: bool | None = None
    first_sink: int | None = None
    sink_share: float | None = None
    sink_positions: list[int] = field(default_factory=list)
    gate_sink: float | None = None
    gate_other: float | None = None
    learned_sink: float | None = None
    sink_kept: int | None = None
    sink_reached: int | None = None
    sink_survives: bool | None = None
    headroom: float | None = None
    super_experts: list[list[int]] | None = None
    ratios: list[float] = field(default_factory=list)
    sink_rates: list[float] | None = None
    valley: int | None = None
    valley_depth: float | None = None
    valley_from_birth: int | None = None
    valley_drop: float | None = None
    valley_drop_without: float | None = None
    entropies: list[float] | None = None
    qk_ratio: float | None = None
    qk_band: str | None = None
    qk_heads: float | None = None
    qk_perplexity: float | None = None
    qk_control: float | None = None
    qk_ratios: list[float] | None = None


@dataclass(kw_only=True)
class Sentence:
    """One answer the rows support: the ``rule`` that wrote it, its ``text``, and the ``rows`` (each row's model) it
    rests on."""

    rule: str
    text: str
    rows: list[str]


@dataclass(kw_only=True)
class Atlas:
    """The atlas as written to atlas.json: a row per model in the order given, the sentences, and the texts and
    settings every model was scanned with."""

    rows: list[Row]
    sentences: list[Sentence]
    settings: dict
    warnings: list[str] = field(default_factory=list)
