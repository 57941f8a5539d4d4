"""The scan's statistics of every block's output, kept on the device: a median sketch and a top-k per block.

A hook only copies a block's output into a buffer, its real positions only (padding enters no statistic; in a
batch of texts of mixed lengths it can be half the positions); a group of blocks is then reduced with one set of
operations.
Reducing each block in its own hook took some twenty small operations per block and batch, each with a fixed cost
(on this project's CPU 50-150 us right after a block's matrix products; on a GPU a kernel launch, and a wait for the
device at each ``nonzero``): 8% of a plain forward pass in massact's code, against 3% grouped, real positions only.
Each entry is rounded to float16 once: that gives the histogram's bin and, per position, the largest bin, which
finds the few positions that may enter the top-k (only those are read in float32).
"""

from __future__ import annotations

import torch

from .prefix import Scratch
from .stats import LogHistogram, State, TopK, check_state, half_bits, magnitude_bits, top_flat

# The buffer of block outputs a group may fill: some twenty of the default model's blocks at a batch of 8 short
# texts, one or a few at long ones; memory stays flat in the corpus size. On the project's CPU 32 MiB cost less than
# 8 MiB (more groups, more operations) and than 128 MiB (a buffer far out of the cache).
GROUP_BYTES = 32 * 2**20


class BlockRecorder:
    """Per block, a ``LogHistogram`` of |a| (the median) and a ``TopK`` of the largest |a| labelled (text, position,
    dim), over every real (not padding) entry of the blocks' outputs.

    For each batch: ``start(texts, real, length)``, then ``add(layer, hidden)`` for each block in order (from a hook),
    then ``finish()``; ``sync()`` gives the statistics. Batches must come in increasing text order (``_merge``'s
    condition), as a scan reads them. Between batches, ``state_dict()`` is every block's statistics and
    ``load_state_dict`` goes on from one (a resumed scan).
    """

    def __init__(self, n_layers: int, candidates: int, device: torch.device | str, group_bytes: int = GROUP_BYTES):
        """``group_bytes``: how much a group of block outputs may hold (at least one block is always held)."""
        self.group_bytes = group_bytes
        self.histograms = [LogHistogram(device=device) for _ in range(n_layers)]
        self.tops = [TopK(candidates) for _ in range(n_layers)]
        self.device = torch.device(device)
        self.k = candidates
        # Counts as int64 (an integer add per block), moved into the float64 histograms only when read (``sync``).
        self._pending = torch.zeros(n_layers, LogHistogram.bins, dtype=torch.long, device=self.device)
        # Every block's top-k in one tensor, so that a group's are merged with one top-k: [layer, k] signed values,
        # [layer, k, 3] labels, each row in kept order, the first ``_kept[layer]`` of it real. Written back to
        # ``tops`` at ``sync``.
        self._values = torch.zeros(n_layers, candidates, device=self.device)
        self._labels = torch.zeros(n_layers, candidates, 3, dtype=torch.long, device=self.device)
        self._kept = torch.zeros(n_layers, dtype=torch.long, device=self.device)
        self._scratch = Scratch()
        self._layers: list[int] = []

    def state_dict(self) -> State:
        """Per block, the histogram's and the top-k's ``state_dict()`` (``histograms`` and ``tops``, one per block in
        order), brought up to date first (``sync``). Taken between batches: a batch's blocks not yet reduced are not
        in it."""
        histograms, tops = self.sync()
        return {"kind": "BlockRecorder", "histograms": [h.state_dict() for h in histograms], "tops": [t.state_dict() for t in tops]}

    def load_state_dict(self, state: State) -> None:
        """Go on from a ``state_dict()`` (a resumed scan's): every block's statistics replaced by the state's, or, where
        any block's does not fit (another number of blocks, bins or k, labels that are not (text, position, dim),
        values that are not float32), a ValueError naming the field, e.g. "tops[3]: k: ...", and nothing changed."""
        check_state(state, "BlockRecorder", ["histograms", "tops"])
        loaded: dict[str, list] = {}
        for name, make in (("histograms", lambda one: LogHistogram.from_state(one, self.device)), ("tops", self._top)):
            if not isinstance(state[name], list):
                raise ValueError(f"{name}: a {type(state[name]).__name__}, not a list")
            if len(state[name]) != len(self.histograms):
                raise ValueError(f"{name}: {len(state[name])} blocks, the model {len(self.histograms)}")
            loaded[name] = []
            for block, one in enumerate(state[name]):
                try:
                    loaded[name].append(make(one))
                except ValueError as error:
                    raise ValueError(f"{name}[{block}]: {error}") from None
        self.histograms, self.tops = loaded["histograms"], loaded["tops"]
        self._pending.zero_()
        self._kept.zero_()
        self._read_tops()

    def _top(self, state: State) -> TopK:
        """A block's top-k from its state, checked to be what this recorder keeps: k, (text, position, dim) labels,
        float32 values (``_values``'s dtype, so that the copy into it is exact)."""
        top = TopK(self.k)
        top.load_state_dict(state)
        if top.values is not None and top.values.dtype != self._values.dtype:
            raise ValueError(f"values: dtype {str(top.values.dtype).removeprefix('torch.')}, not float32")
        if top.labels is not None and top.labels.shape[1] != 3:
            raise ValueError(f"labels: {top.labels.shape[1]} per entry, not 3 (text, position, dim)")
        return top

    def _read_tops(self) -> None:
        """Go on from the top-k lists now in ``tops`` (a loaded state's)."""
        for layer, top in enumerate(self.tops):
            if top.values is not None:
                kept = len(top.values)
                self._values[layer, :kept], self._labels[layer, :kept], self._kept[layer] = top.values, top.labels, kept

    def start(self, texts: torch.Tensor, real: torch.Tensor, length: int) -> None:
        """A new batch: ``texts`` [batch] labels each row; ``real`` are the flat (row x length + position) indices
        of its real positions, ascending: only they enter a statistic."""
        self._texts, self._real, self._length = texts.to(self.device), real.to(self.device), length
        self._layers = []

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        """Block ``layer``'s output [batch, positions, width], kept until its group is complete."""
        width = hidden.shape[-1]
        rows = len(self._real)
        group = max(1, self.group_bytes // (rows * width * 4))
        if len(self._layers) == group:
            self.finish()
        if not self._layers:  # a group's outputs, in the same memory group after group
            self._outputs = self._scratch.take("outputs", (group, rows, width), self._values)
        # A block on another device (``--device-map``) sends its output to the recorder's.
        slot, flat = self._outputs[len(self._layers)], hidden.detach().reshape(-1, width).to(self.device)
        if len(flat) > rows and flat.dtype == slot.dtype:  # padded: the real rows straight into the float32 slot
            torch.index_select(flat, 0, self._real, out=slot)
        elif len(flat) > rows:  # padded, in half precision: index_select's ``out`` takes no other dtype
            slot.copy_(flat.index_select(0, self._real))
        else:  # copy_ widens bfloat16 and float16 exactly
            slot.copy_(flat)
        self._layers.append(layer)

    def finish(self) -> None:
        """Reduce what the batch left in the buffer."""
        if self._layers:
            self._reduce(self._outputs[: len(self._layers)], self._layers)
            self._layers = []

    def sync(self) -> tuple[list[LogHistogram], list[TopK]]:
        """The statistics as they stand: the histograms brought up to date, the top-k lists written back."""
        for histogram, found in zip(self.histograms, self._pending):
            histogram.add_counts(found)
        self._pending.zero_()
        for top, values, labels, kept in zip(self.tops, self._values, self._labels, self._kept.tolist()):
            if kept:
                top.assign(values[:kept].clone(), labels[:kept].clone())
        return self.histograms, self.tops

    def _floors(self, layers: list[int]) -> torch.Tensor:
        """Per block, the ``magnitude_bits`` of the smallest |a| its top-k keeps once full (nothing below it can enter),
        0 before."""
        last = magnitude_bits(self._values[layers[0] : layers[-1] + 1, -1].contiguous())
        return torch.where(self._kept[layers[0] : layers[-1] + 1] == self.k, last, 0)

    def _reduce(self, values: torch.Tensor, layers: list[int]) -> None:
        """Add ``values`` [group, rows, width] (float32), the outputs of consecutive blocks ``layers`` at the
        batch's real positions."""
        group, rows, width = values.shape
        bins = half_bits(values)  # |a| rounded to float16, as its bin: ordered as |a| is (NaN above inf)
        peak = bins.amax(dim=2)  # each position's largest bin
        floors = self._floors(layers)
        # Rounding to float16 keeps order (|a| >= floor gives bin >= the floor's bin): the positions whose peak bin
        # reaches the floor's are all the candidates, and only they are read in float32. A top-k still filling
        # (floor 0) takes every entry instead.
        filling = floors == 0
        bar = half_bits(floors.view(torch.float32)).int().masked_fill_(filling, LogHistogram.bins)
        hot = (peak >= bar[:, None]).nonzero()  # (slot, row), in order
        entries = magnitude_bits(values[hot[:, 0], hot[:, 1]])
        found = (entries >= floors[hot[:, 0]][:, None]).nonzero()  # (hot index, dim), in order
        flat = hot[found[:, 0], 1] * width + found[:, 1]
        chosen = list(flat.split(torch.bincount(hot[found[:, 0], 0], minlength=group).tolist()))
        for slot, fill in enumerate(filling.tolist()):  # at most k per block: a filling block's, or after a cut
            if fill:  # the k largest (ties: smaller index first)
                chosen[slot] = top_flat(values[slot].view(-1).abs(), self.k)
            elif len(chosen[slot]) > self.k:
                chosen[slot] = chosen[slot][top_flat(values[slot].view(-1)[chosen[slot]].abs(), self.k)]
        self._merge(values, layers, chosen)
        for slot, layer in enumerate(layers):  # one count per block: the counts stay small, in the cache
            self._pending[layer] += torch.bincount(bins[slot].view(-1), minlength=LogHistogram.bins)

    def _merge(self, values: torch.Tensor, layers: list[int], chosen: list[torch.Tensor]) -> None:
        """Merge each block's chosen entries (flat indices into its [rows, width], at most k, equal |a| in label
        order) into its top-k, all blocks of the group with one integer top-k. The key is the float's bits, then the
        order of arrival (kept entries first, in their order): labels of a later batch come after every kept one,
        so that is the order of (|a| desc, text, position, dim), as ``TopK.update`` sorts."""
        counts = [len(c) for c in chosen]
        most = max(counts)
        if most == 0:
            return
        group, _, width = values.shape
        block = slice(layers[0], layers[-1] + 1)
        flat = torch.cat(chosen)
        per_block = torch.tensor(counts, device=self.device)
        slot = torch.repeat_interleave(torch.arange(group, device=self.device), per_block)
        place = torch.arange(len(flat), device=self.device) - (per_block.cumsum(0) - per_block)[slot]
        row = self._real[flat // width]  # the batch's flat (row x length + position)
        new_values = torch.zeros(group, most, device=self.device)
        new_values[slot, place] = values.view(group, -1)[slot, flat]
        new_labels = torch.zeros(group, most, 3, dtype=torch.long, device=self.device)
        new_labels[slot, place] = torch.stack([self._texts[row // self._length], row % self._length, flat % width], dim=-1)
        arrival = torch.arange(self.k + most, device=self.device)
        real = torch.cat([arrival[: self.k] < self._kept[block, None], arrival[:most] < per_block[:, None]], 1)
        all_values = torch.cat([self._values[block], new_values], 1)
        keys = (magnitude_bits(all_values).long() << 32) - arrival
        keep = keys.masked_fill_(~real, -(2**62)).topk(self.k, dim=1).indices
        self._values[block] = all_values.gather(1, keep)
        self._labels[block] = torch.cat([self._labels[block], new_labels], 1).gather(1, keep[..., None].expand(-1, -1, 3))
        self._kept[block] = (self._kept[block] + per_block).clamp_(max=self.k)
