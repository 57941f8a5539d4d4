"""Streaming, mergeable statistics that stay on the model's device: a running top-k and a log-histogram median.

Memory is fixed by their parameters, not by how many tokens go through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class LogHistogram:
    """Counts of |a| in log-spaced bins: a quantile sketch whose answer is within ``rel_error`` of a true sample.

    A bin is the float32's exponent and its ``mantissa_bits`` leading mantissa bits: each octave [2**e, 2**(e+1))
    is cut into 2**mantissa_bits equal bins, read straight from the bits (integer work, the same on every device).
    Octaves cover [2**lo, 2**hi) (about 1e-10 to 1e10 with the defaults); values below (zeros included) fall in
    the first bin, values above (inf, NaN) in the last. Inside the range, the reported quantile is the middle of its
    bin, so it is off by at most half a bin: ``rel_error = 2 ** -(mantissa_bits + 1)`` (0.2% with the defaults).
    """

    def __init__(self, lo: int = -34, hi: int = 34, mantissa_bits: int = 8, device: torch.device | str = "cpu"):
        self.lo, self.hi, self.mantissa_bits = lo, hi, mantissa_bits
        self.shift = 23 - mantissa_bits  # float32: 23 mantissa bits below the exponent
        self.first = (lo + 127) << mantissa_bits  # the shifted bits of 2**lo (exponent bias 127)
        self.bins = (hi - lo) << mantissa_bits
        self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)

    @property
    def rel_error(self) -> float:
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum().item())

    def update(self, values: torch.Tensor) -> None:
        """Count |value| of every value."""
        self.add_magnitudes(values.detach().abs())

    def add_magnitudes(self, magnitude: torch.Tensor, padding: int = 0) -> None:
        """Count every |a| of ``magnitude``, except ``padding`` entries the caller set to a negative number: they fall
        in the first bin and are taken off it again (cheaper than selecting the real values first)."""
        # .to(): with a device map the blocks, and so the values, may sit on other devices than the counts.
        bits = magnitude.to(self.counts.device).float().contiguous().view(torch.int32)
        index = (bits >> self.shift).sub_(self.first).clamp_(0, self.bins - 1).flatten()  # negatives (pads): bin 0
        found = torch.bincount(index, minlength=self.bins)
        found[0] -= padding
        self.counts += found

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts.to(self.counts.device)

    def quantile(self, q: float) -> float:
        """The q-quantile of |a| (q=0.5: the median), as the middle of the bin that holds it."""
        total = self.counts.sum()
        if total == 0:
            return math.nan
        cumulative = self.counts.cumsum(0)
        index = int(torch.searchsorted(cumulative, q * total).clamp_max(self.bins - 1).item())
        octave, step = divmod(index, 1 << self.mantissa_bits)
        return 2.0 ** (self.lo + octave) * (1 + (step + 0.5) / (1 << self.mantissa_bits))


def top_order(magnitude: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts entries by ``magnitude`` descending, ties by their ``labels`` rows ascending
    (column by column): a strict total order when labels are unique, so the kept entries do not depend on the order
    they arrived in (batches, a resumed scan, several processes). NaN sorts first, as in ``torch.topk``."""
    order = torch.arange(len(magnitude), device=magnitude.device)
    for column in reversed(range(labels.shape[1])):  # stable sorts, least significant key first
        order = order[labels[order, column].sort(stable=True).indices]
    return order[magnitude[order].sort(descending=True, stable=True).indices]


def float_bits(magnitude: torch.Tensor) -> torch.Tensor:
    """The int32 bits of float32 magnitudes: ordered as the values for non-negative floats (NaN above inf), and
    negative for negative floats (padding set to -1 sorts below every real |a|)."""
    return magnitude.view(torch.int32)


def top_flat(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a flat float32 ``magnitude`` (>= 0, or negative to exclude), ties
    broken by the smaller index, in that order. One integer top-k, no host synchronisation: the key is the float's
    bits (ordered like the value for non-negative floats, NaN above inf) times 2**32, minus the index."""
    key = float_bits(magnitude).to(torch.int64)
    key <<= 32
    key -= _index(magnitude.numel(), magnitude.device)
    return key.topk(min(k, magnitude.numel())).indices


_INDICES: dict[torch.device, torch.Tensor] = {}


def _index(n: int, device: torch.device) -> torch.Tensor:
    """0..n-1 as int64 on ``device``, from one cached arange that grows to the largest n asked (batches vary)."""
    cached = _INDICES.get(device)
    if cached is None or len(cached) < n:
        cached = _INDICES[device] = torch.arange(max(n, 2 * len(cached) if cached is not None else n), device=device)
    return cached[:n]


@dataclass
class TopK:
    """The k largest |a| seen so far, with the signed value and a row of integer labels (e.g. text, position, dim).

    Ties in |a| are broken by the labels (smaller first), so what is kept is the same whatever the order and
    grouping of the updates."""

    k: int
    values: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def _empty(self) -> bool:
        return self.values is None

    def clear(self) -> None:
        self.values, self.labels = None, None

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """values: [n] signed; labels: [n, m] integers on the same device."""
        if not self._empty:
            values = torch.cat([self.values, values.to(self.values.device)])
            labels = torch.cat([self.labels, labels.to(self.labels.device)])
        keep = top_order(values.abs(), labels)[: self.k]
        self.values, self.labels = values[keep], labels[keep]

    def merge(self, other: TopK) -> None:
        if not other._empty:
            self.update(other.values.to(self._device(other)), other.labels.to(self._device(other)))

    def floor(self) -> int:
        """The float bits (``float_bits``) of the smallest |value| kept once k are kept (0 before): nothing below it
        can enter, so a caller may drop smaller entries before ``update``."""
        if self._empty or len(self.values) < self.k:
            return 0
        return int(float_bits(self.values[-1:].abs().float()))

    def _device(self, other: TopK) -> torch.device:
        return other.values.device if self._empty else self.values.device

    def items(self) -> list[tuple[float, list[int]]]:
        """(value, labels) pairs, largest |value| first (ties: smaller labels first), as Python numbers."""
        if self._empty:
            return []
        return list(zip(self.values.float().tolist(), self.labels.tolist()))
