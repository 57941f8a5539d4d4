"""What massact.settings found: its result dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError


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


MAX_COUNT = 2**31 - 1  # the largest count an option takes (islice and torch take a C integer)
# What each numeric option of a scan takes: counts (at least 1; None allowed where the option is optional) and
# positive numbers (an interval where the number is a probability). One table for the API and the command line.
COUNTS = {"top_k": False, "top_neurons": False, "chain_depth": False, "super_weight_steps": False, "batch_size": False,
          "checkpoint_every": False, "max_texts": True, "max_length": True, "block_size": True}
POSITIVE = {"min_abs": False, "min_ratio": False, "clip_z": True}


def check_options(**options) -> None:
    """A UsageError (a ValueError) naming the first option out of its range (see ``COUNTS``, ``POSITIVE``);
    ``sink_epsilon`` is an attention probability, strictly between 0 and 1."""
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None and (COUNTS.get(name) or POSITIVE.get(name)):
            continue
        if name in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
                raise UsageError(f"{flag} ({name}) must be a whole number between 1 and {MAX_COUNT}, not {value!r}")
        elif name in POSITIVE:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} ({name}) must be a positive number, not {value!r}")
        elif name == "sink_epsilon":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise UsageError(f"{flag} ({name}) must be between 0 and 1 (an attention probability), not {value!r}")
