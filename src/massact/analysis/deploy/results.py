"""What the deployment stage finds: the quantization sweep, the half-precision headroom, and the protect list
(protect.json, built by ``massact.analysis.deploy.protect``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...settings import Criterion


@dataclass(kw_only=True)
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



@dataclass(kw_only=True)
class EngineRow:
    """One quantization engine (quanto, hqq, torchao, bnb), one way (``kind``): "all" its block projections quantized,
    "protected" the protect list's modules kept in float, "control" as many random modules of the same kinds kept in
    float (seeded), "sparse" everything quantized and the super weights' quantization error added back. ``settings``:
    what the engine was given (and its library's version); ``modules_in_float`` their names; ``perplexity`` on the
    evaluation text (``perplexity_ratio`` to the float model); the massive value at its birth block on its probe
    (``kept_birth``: as a fraction of the float value); ``weight_bytes``: the block projections' weights as stored
    (quantized, in float where kept, plus a sparse correction's entries) against ``float_bytes`` all in float;
    ``corrections``: entries added back, ``largest_error`` the largest of their relative quantization errors.
    ``refused``: the block projections the engine cannot take (module -> why), in float in every way and counted at
    their float bytes; ``not_kept``: the protect list's super weights (parameter -> why) that no module the engine
    quantizes holds (fused experts' 3-D parameters), so that keeping them out is no choice this engine has."""

    engine: str
    kind: str
    settings: dict
    modules_in_float: list[str]
    perplexity: float
    perplexity_ratio: float
    value_birth: float
    kept_birth: float
    weight_bytes: int
    float_bytes: int
    corrections: int = 0
    largest_error: float = 0.0  # sparse: the largest |w - w_quantized| / |w| among the super weights corrected
    seconds: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)
    not_kept: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
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
    # What the numbers depend on, as one sha256 (``quant.sweep_inputs``): the protect list, the evaluation text, the
    # weights' dtype and device type, and the grid. A later scan of the model with the same inputs keeps this sweep.
    inputs_sha256: str | None = None
    engines: list[EngineRow] = field(default_factory=list)  # the real engines' rows (--engine)
    engine_words: list[str] = field(default_factory=list)  # per engine: does the protect list beat the control?



@dataclass(kw_only=True)
class BlockHeadroom:
    """A block's largest |a| (``dim``), float16's largest finite value over it (``headroom``: below 1 it overflows)."""

    layer: int
    max_abs: float
    dim: int
    headroom: float
    overflows: bool



@dataclass(kw_only=True)
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


FORMAT = "massact-protect"  # protect.json's format field
VERSION = 1  # and its version


@dataclass(kw_only=True)
class Carrier:
    """A token that carries a massive dim: window ``text`` of the scan, ``position``, its largest value and block."""

    text: int
    position: int
    token: str
    block: int
    value: float


@dataclass(kw_only=True)
class ProtectedDim:
    """A massive dim: born at ``born_at``, massive in ``blocks``, largest at ``peak_block`` (``peak_value``).
    ``probe_text`` and ``probe_position`` are where it is strongest at its birth block: read it there."""

    dim: int
    born_at: int
    peak_block: int
    peak_value: float
    blocks: list[int]
    removed_at: list[int]
    probe_text: str
    probe_position: int
    carriers: list[Carrier]


@dataclass(kw_only=True)
class SinkPosition:
    """A position that carries massive activations in some scanned text (the attention-sink candidates), with the
    tokens seen there and in how many texts."""

    position: int
    tokens: list[str]
    texts: int


@dataclass(kw_only=True)
class ProtectedWeight:
    """A super weight: ``model.get_parameter(parameter)[tuple(index)] == value``; ``row`` and ``col`` are the last two
    entries of the stored index (a fused expert weight has the expert first)."""

    parameter: str
    row: int
    col: int
    index: list[int]
    value: float


@dataclass(kw_only=True)
class Protect:
    model: str
    source: str | None
    min_abs: float
    min_ratio: float
    massive_dims: list[ProtectedDim]
    sink_positions: list[SinkPosition]
    super_weights: list[ProtectedWeight]
    format: str = FORMAT
    version: int = VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def criterion(self) -> Criterion:
        """The scan's massive test, as saved with the list."""
        return Criterion(min_abs=self.min_abs, min_ratio=self.min_ratio)


@dataclass(kw_only=True, slots=True)
class Deploy:
    """What deploying the model in lower precision meets: each block's float16 and bfloat16 headroom (None before
    the deploy stage ran), and with ``--quant`` the quantization sweep."""

    precision: Precision | None = None
    quantization: Quantization | None = None
