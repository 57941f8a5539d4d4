"""What massact.settings found: its result dataclasses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Criterion:
    """An activation a is massive when |a| >= min_abs and |a| >= min_ratio x the median |a| of its hidden state."""

    min_abs: float = 100.0
    min_ratio: float = 1000.0
    median: str = "median |a| over every token of every text at that block's output"
    median_rel_error: float = 0.0

    def threshold(self, median):
        """The smallest |a| that is massive against ``median``: max(min_abs, min_ratio x median)."""
        return max(self.min_abs, self.min_ratio * median) if isinstance(median, (int, float)) else \
            (self.min_ratio * median).clamp(min=self.min_abs)

    def is_massive(self, value, median):
        """|value| >= min_abs and |value| >= min_ratio x median: a bool for numbers, elementwise for tensors
        (``median`` broadcast against ``value``). NaN is never massive."""
        magnitude = abs(value)
        return (magnitude >= self.min_abs) & (magnitude >= self.min_ratio * median)
