"""What the detection stage finds: per-block statistics, the massive entries, and each massive dim's summary."""

from __future__ import annotations

from dataclasses import dataclass


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
