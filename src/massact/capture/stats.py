"""Streaming, mergeable statistics that stay on the model's device: a running top-k and a float16-histogram median.

Memory is fixed by their parameters, not by how many tokens go through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class LogHistogram:
    """Counts of |a| rounded to float16: a quantile sketch whose answer is within ``rel_error`` of a true sample.

    A bin is a float16 bit pattern with the sign dropped (``bins`` of them, from 0.0 up through the subnormals, the
    normals, inf and NaN): each octave from 2**-14 to 2**15 is cut into 1024 equal bins. Rounding to the nearest
    float16 is one conversion on any device, and the counts come from the bits. The reported quantile is the float16
    of its bin, so it is off by at most half a float16 step: ``rel_error = 2**-11`` (0.05%) for quantiles in the
    normal range, 6.1e-5 to 65504. Below it, the steps are even (2**-24) and ``error_at`` gives the bound; above it,
    values count as inf. A hidden state's median sits far inside the range.
    """

    bins = 1 << 15
    rel_error = 2.0**-11

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)

    @property
    def total(self) -> int:
        return int(self.counts.sum().item())

    def update(self, values: torch.Tensor) -> None:
        """Count |value| of every value."""
        bits = half_bits(values.detach().to(self.counts.device).reshape(-1))
        self.add_counts(torch.bincount(bits, minlength=self.bins))

    def add_counts(self, found: torch.Tensor) -> None:
        """Add counts per bin (``bincount`` of ``half_bits``, ``bins`` long)."""
        self.counts += found.to(self.counts.device)

    @classmethod
    def error_at(cls, value: float) -> float:
        """The largest relative error of a reported quantile ``value``: half a float16 step over the value."""
        if not 0 < value < math.inf:
            return 0.0 if value == 0 else math.nan
        return max(cls.rel_error, 2.0**-25 / value)  # under 2**-14 the steps are 2**-24

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts.to(self.counts.device)

    def quantile(self, q: float) -> float:
        """The q-quantile of |a| (q=0.5: the median), as the float16 of the bin that holds it."""
        total = self.counts.sum()
        if total == 0:
            return math.nan
        cumulative = self.counts.cumsum(0)
        index = torch.searchsorted(cumulative, q * total).clamp_max(self.bins - 1).to(torch.int16)
        return float(index.view(torch.float16).item())


def top_order(magnitude: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts entries by ``magnitude`` descending, ties by their ``labels`` rows ascending
    (column by column): a strict total order when labels are unique, so the kept entries do not depend on the order
    they arrived in (batches, a resumed scan, several processes). NaN sorts first, as in ``torch.topk``."""
    order = torch.arange(len(magnitude), device=magnitude.device)
    for column in reversed(range(labels.shape[1])):  # stable sorts, least significant key first
        order = order[labels[order, column].sort(stable=True).indices]
    return order[magnitude[order].sort(descending=True, stable=True).indices]


def half_bits(values: torch.Tensor) -> torch.Tensor:
    """The bins of |value|: the int16 bits of each value rounded to float16, sign dropped (a new tensor)."""
    bits = values.to(torch.float16).view(torch.int16)
    bits &= 0x7FFF
    return bits


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The int32 bits of |value| for float32 ``values`` (a new tensor): the sign bit cleared, so ordered as |value|
    is, NaN above inf (``float_bits`` of the magnitude, without a float ``abs`` first)."""
    return values.contiguous().view(torch.int32) & 0x7FFFFFFF


def float_bits(magnitude: torch.Tensor) -> torch.Tensor:
    """The int32 bits of float32 magnitudes: ordered as the values for non-negative floats (NaN above inf), and
    negative for negative floats (below every real |a|)."""
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

    def assign(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the kept entries to ``values`` and ``labels``, already in kept order (|a| desc, then labels)."""
        self.values, self.labels = values, labels

    def merge(self, other: TopK) -> None:
        if not other._empty:
            self.update(other.values.to(self._device(other)), other.labels.to(self._device(other)))

    def _device(self, other: TopK) -> torch.device:
        return other.values.device if self._empty else self.values.device

    def items(self) -> list[tuple[float, list[int]]]:
        """(value, labels) pairs, largest |value| first (ties: smaller labels first), as Python numbers."""
        if self._empty:
            return []
        return list(zip(self.values.float().tolist(), self.labels.tolist()))
