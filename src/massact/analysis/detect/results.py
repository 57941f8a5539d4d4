"""What the detection stage finds: per-block statistics, the massive entries, and each massive dim's summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...settings import Criterion


@dataclass(kw_only=True)
class Entry:
    """One activation: its signed value at (text, position, dim); ``token`` is the decoded token there. ``stream``:
    with hyper-connections, the stream of the block state it is in ("s0", "s1", ...) or "read", the combination of the
    streams the next sublayer (after the last block, the final norm) reads; "" where the state is one stream."""

    value: float
    text: int
    position: int
    token: str
    dim: int
    stream: str = ""



@dataclass(kw_only=True)
class LayerStats:
    """A block's residual output (block i = HF hidden_states[i+1], taken before any final norm). With
    hyper-connections, ``median`` and ``top`` are over every stream, and ``streams`` has each stream's own statistics
    (and those of the combination the next sublayer reads)."""

    layer: int
    median: float
    ratio: float
    top: list[Entry]
    streams: list[StreamStats] = field(default_factory=list)


@dataclass(kw_only=True)
class StreamStats:
    """One stream of a hyper-connection block's output ("s0", ...; "read": the combination the next sublayer, or the
    final norm, reads): its median |a|, the ratio of its largest |a| to it, and its largest entries."""

    stream: str
    median: float
    ratio: float
    top: list[Entry]



@dataclass(kw_only=True)
class Massive:
    """A massive entry; ``ratio`` is |value| over its block's median |a| (with hyper-connections, over its stream's:
    the criterion holds per stream, and ``stream`` names it as ``Entry.stream`` does)."""

    layer: int
    text: int
    position: int
    token: str
    dim: int
    value: float
    ratio: float
    stream: str = ""



@dataclass(kw_only=True)
class DimSummary:
    """Where a massive dim lives: the block that first makes it massive, every block where it is, where it falls back."""

    dim: int
    born_at: int
    persists: list[int]
    removed_at: list[int]
    max_value: float
    tokens: list[str]
    streams: list[str] = field(default_factory=list)  # with hyper-connections: the streams it is massive in, in order


@dataclass(kw_only=True, slots=True)
class Findings:
    """What the detection stage hands every later stage: the kept windows (``texts`` and their ``tokens``, by window
    index: only the windows the report points at, and the first few), the ``criterion`` that calls a value massive,
    each block's statistics, the massive entries and the massive dims they group into."""

    texts: dict[int, str]
    tokens: dict[int, list[str]]
    criterion: Criterion
    layers: list[LayerStats]
    massive: list[Massive]
    dims: list[DimSummary]

    @property
    def medians(self) -> list[float]:
        """Each block's median |a| over the scanned tokens: what the criterion's ratio is taken against."""
        return [stats.median for stats in self.layers]

    def stream_medians(self, stream: str) -> list[float]:
        """Each block's median |a| in hyper-connection ``stream`` ("s0", ...): what a value there is judged against;
        ``medians`` where ``stream`` is "" (one stream)."""
        if not stream:
            return self.medians
        return [next(s.median for s in stats.streams if s.stream == stream) for stats in self.layers]
