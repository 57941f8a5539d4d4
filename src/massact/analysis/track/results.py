"""What a track holds (track.json): per checkpoint the massive dims and the sink, per dim its emergence, the events
in order, the role moves, and for two checkpoints the weight changes at the super weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...settings import Criterion


@dataclass(kw_only=True)
class TrackSuperWeight:
    """The super weight of a dim at a checkpoint: ``matrix[row, col]`` as stored, its value and its rank by |w| in
    the matrix (1 = largest)."""

    matrix: str
    row: int
    col: int
    value: float
    rank: int


@dataclass(kw_only=True)
class DimState:
    """A massive dim at one checkpoint: its largest value over the texts (signed) and ratio to its block's median
    |a|, the block where it is born and the sublayer that writes it there, the top neurons of that write, the
    super weight, and the lifeline's phases as "name first-last" (e.g. "birth 11-11")."""

    dim: int
    value: float
    ratio: float
    born_at: int
    writer: str | None = None
    neurons: list[int] = field(default_factory=list)
    super_weight: TrackSuperWeight | None = None
    phases: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class BlockState:
    """A block's output at one checkpoint: the largest |a| (top1), the median |a| over every token, their ratio, how
    many entries are massive and the dim of the largest."""

    layer: int
    top1: float
    median: float
    ratio: float
    massive: int
    top_dim: int | None


@dataclass(kw_only=True)
class CheckpointState:
    """One checkpoint of the track. ``step``: the training step (None where the spec has none); ``label``: the step, or
    the spec where there is none; ``report``: the folder of its full report (None for a monitor record). Sink: the
    share of (text, head) pairs whose attention on the sink tokens passes epsilon, over all blocks (``sink_rate``),
    and the first block with a sink (both None without verification). ``headroom``: float16's largest value over the
    largest |a| (below 1, float16 overflows)."""

    step: int | None
    spec: str
    label: str
    dims: list[DimState]
    blocks: list[BlockState]
    report: str | None = None
    sink_rate: float | None = None
    first_sink_layer: int | None = None
    headroom: float | None = None
    super_experts: list[list[int]] = field(default_factory=list)  # [block, expert] of each super expert (a mixture of experts)


@dataclass(kw_only=True)
class DimTrack:
    """A dim massive at some checkpoint: where it is first massive (``emerged_at``: the step, or the spec where there
    are no steps; None if never) and, per checkpoint in order, its largest |a| (0 where the report lists none)."""

    dim: int
    emerged_at: int | str | None
    values: list[float]
    born_at: list[int | None]


@dataclass(kw_only=True)
class RoleMove:
    """The role moves between two consecutive checkpoints: dim ``before`` is massive at the first, ``after`` at the
    second, and they share the writer neuron or the super weight (``shared`` says which)."""

    label_before: str
    label_after: str
    before: int
    after: int
    shared: str


@dataclass(kw_only=True)
class WeightChange:
    """The change of a super weight between the two checkpoints of a diff: its value in each, the change, and the
    change against the mean |change| over its whole matrix (``relative``: 1 = an ordinary entry of that matrix)."""

    dim: int
    matrix: str
    row: int
    col: int
    before: float
    after: float
    change: float
    matrix_mean_change: float
    relative: float | None


@dataclass(kw_only=True)
class Diff:
    """Two checkpoints: which massive dims persist, appear and vanish, whether the sink persists, and the weight
    change at each super weight of either."""

    before: str
    after: str
    persist: list[int]
    appear: list[int]
    vanish: list[int]
    sink: str
    weights: list[WeightChange]
    unchanged: bool


@dataclass(kw_only=True)
class Track:
    """The track as written to track.json: the checkpoints in training order, every dim that is massive somewhere,
    the events in order (sentences), the role moves, the diff of two checkpoints, and the settings every
    checkpoint was scanned with."""

    checkpoints: list[CheckpointState]
    dims: list[DimTrack]
    events: list[str]
    moves: list[RoleMove]
    settings: dict
    diff: Diff | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class MonitorBlock:
    """One block at one training step: the largest |a| (top1), the median |a|, their ratio, how many of the kept
    entries are massive and the dim of the largest; null where a number is not finite (a float16 overflow, a zero
    median) or the block kept nothing."""

    layer: int
    top1: float | None
    median: float | None
    ratio: float | None
    massive: int
    top_dim: int | None


@dataclass(kw_only=True)
class MonitorRecord:
    """One line of a training monitor's JSONL file: the step, how many probe texts, every block, the criterion."""

    step: int
    texts: int
    blocks: list[MonitorBlock]
    criterion: Criterion
