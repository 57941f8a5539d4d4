"""Streaming, mergeable statistics that stay on the model's device: a running top-k and a float16-histogram median.

Memory is fixed by their parameters, not by how many tokens go through them. Each has the state protocol of torch
modules: ``state_dict()`` (a snapshot of plain values and CPU tensors, which ``torch.load(weights_only=True)`` reads)
and ``load_state_dict(state)``, which restores it exactly or refuses a state of the wrong kind or shape with a
``ValueError`` naming the field; a resumed scan is made of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

State = dict[str, Any]  # a statistic's ``state_dict()``: its kind (str), ints, floats, CPU tensors, None, nested states


def check_state(state: object, kind: str, fields: Iterable[str]) -> State:
    """``state`` itself if it is a dict of ``kind`` (its "kind" field) with exactly ``fields`` besides it; otherwise a
    ValueError naming the field (torch's strict ``load_state_dict`` also refuses missing and unexpected keys)."""
    if not isinstance(state, dict):
        raise ValueError(f"a {kind} state is a dict, not a {type(state).__name__}")
    if state.get("kind") != kind:
        raise ValueError(f"kind: {state.get('kind')!r}, not {kind!r}")
    expected = {"kind", *fields}
    missing, unexpected = sorted(expected - state.keys()), sorted(map(str, state.keys() - expected))
    if missing:
        raise ValueError(f"{missing[0]}: missing")
    if unexpected:
        raise ValueError(f"{unexpected[0]}: not a field of a {kind} state")
    return state


def state_tensor(state: State, name: str, shape: tuple[int | None, ...], what: str = "floating") -> torch.Tensor:
    """``state[name]``, checked to be a tensor of ``shape`` (None: any length there) whose dtype is ``what``
    ("floating", "integer" or a dtype's name, e.g. "float64"); otherwise a ValueError naming the field."""
    value = state[name]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: a {type(value).__name__}, not a tensor")
    if value.dim() != len(shape) or any(want is not None and have != want for have, want in zip(value.shape, shape)):
        wanted = ", ".join("n" if want is None else str(want) for want in shape)
        raise ValueError(f"{name}: shape {list(value.shape)}, not [{wanted}]")
    integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    fits = value.is_floating_point() if what == "floating" else integer if what == "integer" else str(value.dtype) == f"torch.{what}"
    if not fits:
        raise ValueError(f"{name}: dtype {str(value.dtype).removeprefix('torch.')}, not {what}")
    return value


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` that later updates of the statistic do not change."""
    return tensor.detach().to("cpu", copy=True)


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

    def state_dict(self) -> State:
        """The counts per bin (float64 [bins], on the CPU): a snapshot, which later updates leave as it is."""
        return {"kind": "LogHistogram", "counts": _snapshot(self.counts)}

    def load_state_dict(self, state: State) -> None:
        """Set the counts to a ``state_dict()``'s, on this histogram's device; a state of another kind, another number
        of bins, or counts that are not whole numbers >= 0 is a ValueError naming the field."""
        counts = state_tensor(check_state(state, "LogHistogram", ["counts"]), "counts", (None,), "float64")
        if len(counts) != self.bins:
            raise ValueError(f"counts: has {len(counts)} bins, not {self.bins}")
        if not bool(((counts >= 0) & (counts == counts.round())).all()):  # NaN fails both
            raise ValueError("counts: holds a negative, fractional or NaN count")
        self.counts.copy_(counts)

    @classmethod
    def from_state(cls, state: State, device: torch.device | str = "cpu") -> LogHistogram:
        """A histogram on ``device`` holding ``state`` (see ``load_state_dict``)."""
        histogram = cls(device=device)
        histogram.load_state_dict(state)
        return histogram

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

    def state_dict(self) -> State:
        """k, and the kept entries in kept order on the CPU (values [n] signed, labels [n, m]; None before any entry):
        a snapshot, which later updates leave as it is."""
        kept = (None, None) if self._empty else (_snapshot(self.values), _snapshot(self.labels))
        return {"kind": "TopK", "k": self.k, "values": kept[0], "labels": kept[1]}

    def load_state_dict(self, state: State) -> None:
        """Keep exactly a ``state_dict()``'s entries, on the device of the entries they replace (where the state's
        are when there are none). A state of another kind or k, values and labels of other shapes or dtypes, more
        than k entries, or entries out of kept order (NaN, then |a| desc, then labels) is a ValueError naming the
        field."""
        check_state(state, "TopK", ["k", "values", "labels"])
        if not isinstance(state["k"], int) or isinstance(state["k"], bool):
            raise ValueError(f"k: a {type(state['k']).__name__}, not an int")
        if state["k"] != self.k:
            raise ValueError(f"k: the state keeps {state['k']} entries, this top-k {self.k}")
        if state["values"] is None or state["labels"] is None:
            if state["values"] is not None or state["labels"] is not None:
                raise ValueError(f"{'labels' if state['labels'] is None else 'values'}: None while the other is not")
            self.clear()
            return
        values = state_tensor(state, "values", (None,), "floating")
        labels = state_tensor(state, "labels", (len(values), None), "integer")
        if len(values) > self.k:
            raise ValueError(f"values: holds {len(values)} entries, more than k = {self.k}")
        # NaN comes first, in any order among them: a recorder orders NaNs by their bits, which differ between
        # kernels (a vectorized maximum makes all-ones NaNs), where ``top_order`` takes them as ties.
        nans = int(values.isnan().sum())
        rest = torch.arange(len(values) - nans, device=values.device)
        if not (values[:nans].isnan().all() and torch.equal(top_order(values[nans:].abs(), labels[nans:]), rest)):
            raise ValueError("values: not in kept order (NaN, then |a| descending, ties by labels ascending)")
        device = values.device if self._empty else self.values.device
        self.values, self.labels = values.to(device, copy=True), labels.to(device, copy=True)

    @classmethod
    def from_state(cls, state: State) -> TopK:
        """A top-k holding ``state`` (see ``load_state_dict``), its k the state's."""
        k = state.get("k") if isinstance(state, dict) else None
        top = cls(k if isinstance(k, int) and not isinstance(k, bool) else 0)
        top.load_state_dict(state)
        return top

    def items(self) -> list[tuple[float, list[int]]]:
        """(value, labels) pairs, largest |value| first (ties: smaller labels first), as Python numbers."""
        if self._empty:
            return []
        return list(zip(self.values.float().tolist(), self.labels.tolist()))
