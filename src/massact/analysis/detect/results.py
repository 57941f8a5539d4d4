"""What the detection stage finds: per-block statistics, the massive entries, and each massive dim's summary."""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import Criterion


@dataclass(kw_only=True)
class Entry:
    """One activation: its signed value at (text, position, dim); ``token`` is the decoded token there."""

    value: float
    text: int
    position: int
    token: str
    dim: int



@dataclass(kw_only=True)
class LayerStats:
    """A block's residual output (block i = HF hidden_states[i+1], taken before any final norm)."""

    layer: int
    median: float
    ratio: float
    top: list[Entry]



@dataclass(kw_only=True)
class Massive:
    layer: int
    text: int
    position: int
    token: str
    dim: int
    value: float
    ratio: float



@dataclass(kw_only=True)
class DimSummary:
    """Where a massive dim lives: the block that first makes it massive, every block where it is, where it falls back."""

    dim: int
    born_at: int
    persists: list[int]
    removed_at: list[int]
    max_value: float
    tokens: list[str]


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
