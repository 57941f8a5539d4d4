"""Every option of a scan in one frozen object, and the massive test they set.

``ScanSettings`` is what ``massact.scan`` takes, what report.json saves whole (``settings``) and what ``massact
verify``, ``quant`` and ``track`` read back, so that a saved report is re-run as it was made. ``Criterion`` is the one
place where "massive" is decided.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")
QUANT_GRIDS = ("default", "full", "none")  # none: the real engines' rows only (--engine)
ENGINES = ("quanto", "hqq", "torchao", "bnb")  # the quantization libraries --engine drives


# What the sweep uses where ``clip_z`` and ``block_size`` are None: the held-out variant's clipping z-score, and the
# entries per flat block of the block-wise RTN settings (Yu et al. vary it; larger blocks feel a super weight more).
QUANT_DEFAULTS = {"clip_z": 4.0, "block_size": 16384}

@dataclass(kw_only=True)
class Criterion:
    """An activation a is massive when |a| >= min_abs and |a| >= min_ratio x the median |a| of its hidden state.

    Args:
        min_abs: The smallest massive |a|, a finite number >= 0.
        min_ratio: The smallest massive |a| / median |a|, a finite number >= 0.
        median: What the median is taken over, as the report says it.
        median_rel_error: The median's relative error bound; the scan sets it from its median sketch (default 0).

    Raises:
        TypeError: ``min_abs`` or ``min_ratio`` is not a number.
        UsageError: ``min_abs`` or ``min_ratio`` is negative, NaN or infinite (a ``ValueError``).
    """

    min_abs: float = 100.0
    min_ratio: float = 1000.0
    median: str = "median |a| over every token of every text at that block's output"
    median_rel_error: float = 0.0

    def __post_init__(self) -> None:
        # A negative or NaN bound would flag everything or nothing without a word; 0 is a bound that always holds.
        for name in ("min_abs", "min_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Criterion {name} must be a number, not {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"Criterion {name} must be a finite number >= 0, not {value!r}")

    def threshold(self, median):
        """The smallest |a| that is massive against ``median``: max(min_abs, min_ratio x median)."""
        return max(self.min_abs, self.min_ratio * median) if isinstance(median, (int, float)) else \
            (self.min_ratio * median).clamp(min=self.min_abs)

    def is_massive(self, value, median):
        """|value| >= min_abs and |value| >= min_ratio x median: a bool for numbers, elementwise for tensors
        (``median`` broadcast against ``value``). NaN is never massive."""
        magnitude = abs(value)
        return (magnitude >= self.min_abs) & (magnitude >= self.min_ratio * median)


@dataclass(frozen=True, kw_only=True)
class ScanSettings:
    """The options of one scan. Defaults are the CLI's; each group feeds one stage of ``massact.pipeline``."""

    # Detection: what is massive, how many of each block's largest |a| are listed.
    min_abs: float = 100.0
    min_ratio: float = 1000.0
    top_k: int = 5
    # The corpus pass: texts per forward pass, windows of at most max_length tokens (None: refuse longer texts),
    # the merged state saved every checkpoint_every batches.
    batch_size: int = 8
    max_length: int | None = None
    checkpoint_every: int = 50
    # Mechanism and trigger: neurons listed per attribution, links followed back from the writing neuron.
    top_neurons: int = 10
    chain_depth: int = 3
    # Causal checks: interventions and attention sinks (verify), super weights zeroed one after another, a head is a
    # sink head when its average attention on a sink token exceeds sink_epsilon (Gu et al. 2024).
    verify: bool = False
    super_weight_steps: int = 5
    sink_epsilon: float = 0.3
    eval_file: str | None = None  # the evaluation text's absolute path; None: the shipped public-domain sample
    # Super experts (Su et al. 2025), in a mixture of experts: an expert whose largest |output| over the corpus is
    # above this quantile of every (block, expert) maximum, above this fraction of the largest, and in the first
    # this-share of the blocks.
    super_expert_quantile: float = 0.995
    super_expert_fraction: float = 0.1
    super_expert_depth: float = 0.75
    # Deployment: the quantization sweep, its grid, the held-out variant's clipping z-score, the flat block size.
    quant: bool = False
    quant_grid: str = "default"
    clip_z: float | None = None  # None: QUANT_DEFAULTS["clip_z"] (saved as None, as reports have always saved it)
    block_size: int | None = None  # None: QUANT_DEFAULTS["block_size"]
    engines: tuple[str, ...] = ()  # real quantization libraries to measure the protect list in, beside the simulated grid
    # The model's number format and device as asked ("auto": a GPU where there is one).
    dtype: str = "float32"
    device: str = "auto"

    @property
    def criterion(self) -> Criterion:
        return Criterion(min_abs=self.min_abs, min_ratio=self.min_ratio)

    def replace(self, **changes) -> ScanSettings:
        """A copy with ``changes``; an unknown name is a TypeError that names it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown scan setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def check(self) -> ScanSettings:
        """Every value in its range, or a UsageError naming the option as the CLI spells it (one line)."""
        for name in ("top_k", "batch_size", "checkpoint_every", "top_neurons", "chain_depth", "super_weight_steps"):
            whole(name, getattr(self, name), 1)
        if self.max_length is not None:
            whole("max_length", self.max_length, 2)
        if self.block_size is not None:
            whole("block_size", self.block_size, 1)
        for name in ("min_abs", "min_ratio"):
            _number(name, getattr(self, name))
        if self.clip_z is not None:
            _number("clip_z", self.clip_z)
        _number("sink_epsilon", self.sink_epsilon)
        if not self.sink_epsilon < 1:
            raise UsageError("--sink-epsilon must be between 0 and 1 (an attention probability)")
        for name in ("super_expert_quantile", "super_expert_fraction", "super_expert_depth"):
            _number(name, getattr(self, name))
            if not getattr(self, name) <= 1:
                raise UsageError(f"{_option(name)} must be between 0 and 1, not {getattr(self, name)!r}")
        for name in ("verify", "quant"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{_option(name)} must be true or false, not {getattr(self, name)!r}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("quant_grid", self.quant_grid, QUANT_GRIDS)
        if not isinstance(self.engines, (tuple, list)):
            raise UsageError(f"--engine must be a list of engines, not {self.engines!r}")
        for name in self.engines:
            _choice("engine", name, ENGINES)
        for name in ("device", "eval_file"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name == "eval_file")):
                raise UsageError(f"{_option(name)} must be a string, not {value!r}")
        return self


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


MAX_COUNT = 2**31 - 1  # the largest count an option takes: islice and torch take C integers


def whole(name: str, value, least: int) -> None:
    """A UsageError unless ``value`` is a whole number from ``least`` to MAX_COUNT."""
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_COUNT:
        raise UsageError(f"{_option(name)} must be a whole number of at least {least} (at most {MAX_COUNT}), not {value!r}")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UsageError(f"{_option(name)} must be a positive number, not {value!r}")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{_option(name)} must be one of {', '.join(choices)}, not {value!r}")
