"""The corpus carried through a model one block at a time, the loops turned around: blocks outside, batches inside.

Each block's weights are read from the checkpoint once per pass, when the pass reaches it (the next block's are read
in a thread while this one computes), every batch of the corpus goes through it, and the weights are released. Each
batch's output of the block before stands in for the blocks before it (``prefix.run_from``), so the block computes
what the model in memory computes, with the arguments the model's own forward gives it (masks, rotary positions,
per-layer inputs); hooks on the block's sites see what they see in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import StreamedModel, release
from ..models.loading import LoadedModel
from .hooks import forward_until
from .prefix import copy_output, run_from


@dataclass(frozen=True, kw_only=True)
class Batch:
    """One batch of the corpus: its token ids and attention mask [batch, positions] and the windows' indices."""

    ids: torch.Tensor
    mask: torch.Tensor
    texts: torch.Tensor


@dataclass(kw_only=True)
class HiddenStates:
    """The corpus's hidden states between two blocks, one entry per batch (a block's output: its leading tensor, and
    what else the block returns, kept as it is). Entries stay on the model's device while ``device_bytes`` allows,
    then in host memory while ``host_bytes`` allows, then in one memory-mapped file at ``path``: each entry's place is
    fixed when it is first put (a batch's state has the same shape after every block), so the file is written in
    place block after block and, after an interruption, holds the states of the last finished block.

    On a CPU model the device is the host: ``device_bytes`` is then 0 and ``host_bytes`` the whole allowance.
    ``pool``: what the device and host memory hold of the states of every ``HiddenStates`` that shares it (the
    allowances are for all of them); by default its own."""

    device: torch.device
    device_bytes: int
    host_bytes: int
    path: Path
    places: dict[int, str] = field(default_factory=dict)  # batch -> "device", "host" or "file"
    used: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "file": 0})
    pool: dict[str, int] | None = None
    _values: dict[int, Any] = field(default_factory=dict, repr=False)
    _offsets: dict[int, tuple[int, torch.Size, torch.dtype]] = field(default_factory=dict, repr=False)
    _file: torch.Tensor | None = field(default=None, repr=False)

    def reserve(self, index: int, like: torch.Tensor) -> str:
        """Fix where batch ``index``'s state lives, for a leading tensor like ``like``; returns the place."""
        size = like.numel() * like.element_size()
        pool = self.used if self.pool is None else self.pool
        for place, allowed in (("device", self.device_bytes), ("host", self.host_bytes)):
            if pool[place] + size <= allowed:
                pool[place] += size
                break
        else:
            place = "file"
            self._offsets[index] = (self.used["file"], like.shape, like.dtype)
            self.used[place] += size
        self.places[index] = place
        return place

    def put(self, index: int, value: Any) -> None:
        """Keep ``value`` (a block's output on batch ``index``) as that batch's state."""
        head, rest = (value, None) if isinstance(value, torch.Tensor) else (value[0], tuple(value[1:]))
        place = self.places.get(index) or self.reserve(index, head)
        if place == "file":
            self._slot(index).copy_(head)
            self._values[index] = (None, rest)
        else:
            self._values[index] = (head.to("cpu") if place == "host" and self.device.type != "cpu" else head, rest)

    def get(self, index: int) -> Any:
        """Batch ``index``'s state on the model's device (None before the first block)."""
        if index not in self._values:
            return None
        head, rest = self._values[index]
        head = (self._slot(index) if head is None else head).to(self.device)
        return head if rest is None else (head, *rest)

    def held(self, index: int) -> Any:
        """Batch ``index``'s state where it is held (None before the first block), unchanged by a later ``put``: a
        state in memory is replaced by the next, one in the file written over, so that one is copied out."""
        if index not in self._values:
            return None
        head, rest = self._values[index]
        head = self._slot(index).clone() if head is None else head
        return head if rest is None else (head, *rest)

    def _slot(self, index: int) -> torch.Tensor:
        """Batch ``index``'s view of the memory-mapped file, the file grown to every reserved entry when first used."""
        if self._file is None or self._file.numel() < self.used["file"]:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.truncate(self.used["file"])
            self._file = torch.from_file(str(self.path), shared=True, size=self.used["file"], dtype=torch.uint8)
        start, shape, dtype = self._offsets[index]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self._file[start:start + size].view(dtype).view(shape)

    def in_file(self) -> bool:
        """Whether every state is in the file (a state saved now needs nothing written but itself)."""
        return bool(self.places) and all(place == "file" for place in self.places.values())

    def persist(self) -> dict:
        """Move every state into the file and return what finds them there again (``restore``): each batch's place in
        the file, shape and dtype, and the rest of its block output (None or tensors, on the host)."""
        for index in sorted(self._values):
            head, rest = self._values[index]
            if head is not None:
                (self.used if self.pool is None else self.pool)[self.places[index]] -= head.numel() * head.element_size()
                self.places[index] = "file"
                self._offsets[index] = (self.used["file"], head.shape, head.dtype)
                self.used["file"] += head.numel() * head.element_size()
                self._slot(index).copy_(head)
                self._values[index] = (None, rest)
        self._file = None  # its pages are written back when the mapping goes
        return {"size": self.used["file"],
                "entries": {index: [start, list(shape), str(dtype).removeprefix("torch.")]
                            for index, (start, shape, dtype) in self._offsets.items()},
                "rest": {index: None if rest is None else [_on_host(part) for part in rest]
                         for index, (_, rest) in self._values.items()}}

    def restore(self, saved: dict) -> None:
        """Find the states ``persist`` left in the file again (a resumed pass); the file must hold them."""
        size = self.path.stat().st_size if self.path.is_file() else 0
        if size < saved["size"]:
            raise ValueError(f"{self.path} holds {size} bytes, the saved states need {saved['size']}")
        self.used["file"] = saved["size"]
        for index, (start, shape, dtype) in saved["entries"].items():
            self._offsets[index] = (start, torch.Size(shape), getattr(torch, dtype))
            self.places[index] = "file"
            rest = saved["rest"].get(index)
            self._values[index] = (None, None if rest is None else tuple(rest))

    def remove(self) -> None:
        """Delete the file (at the end of a finished pass)."""
        self._file = None
        self.path.unlink(missing_ok=True)


def _on_host(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def blocks(streamed: StreamedModel, layers: Sequence[int], keep: int = -1) -> Iterator[int]:
    """Yield each block of ``layers`` with its weights loaded on the model's device, releasing it after the caller's
    step; the next block's tensors are read in a thread meanwhile. The blocks up to ``keep`` stay loaded until the
    step of block ``keep`` is over (what the caller runs on them then sees blocks 0..keep as the model in memory),
    then go together; a step that fails releases them too."""
    checkpoint, lm = streamed.checkpoint, streamed.lm
    held: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(checkpoint.read, checkpoint.blocks[layers[0]]) if layers else None
        for step, layer in enumerate(layers):
            tensors = pending.result()
            if step + 1 < len(layers):
                pending = reader.submit(checkpoint.read, checkpoint.blocks[layers[step + 1]])
            checkpoint.load(lm.model, tensors, streamed.dtype, lm.device)
            del tensors
            streamed.loaded(layer)
            began = time.perf_counter()
            try:
                yield layer
            except BaseException:  # the pass ends here (an error, an interruption): the kept blocks go with this one
                keep = -1
                raise
            finally:
                streamed.computing += time.perf_counter() - began
                held.append(layer)
                if layer >= keep:
                    _release(lm, held)


def _release(lm: LoadedModel, layers: list[int]) -> None:
    """Release the blocks ``layers`` (emptying the list) and hand their memory back."""
    if layers:
        for layer in layers:
            release(lm.adapter.blocks(lm.model)[layer])
        layers.clear()
        _give_back_freed_memory()


def _give_back_freed_memory() -> None:
    """Hand the freed block's memory back to the system. glibc raises its threshold for serving allocations from
    their own mappings each time such a large one is freed, so the next blocks' tensors come from the heap, which
    it keeps: without this the peak grows by most of a block per block (measured: 12.6 MB blocks, 193 MB more over
    12 more blocks)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and libc.malloc_trim else None
    except (OSError, AttributeError):  # no C library found, or not glibc (musl, macOS): nothing to hand back
        return None


_LIBC = _libc()


def run_block(lm: LoadedModel, layer: int, batch: Batch, previous: Any) -> Any:
    """Block ``layer``'s output on ``batch`` (a tensor, or the tuple the block returns), given ``previous``, the
    block before's output on it (None for block 0): the model's forward on the batch, the blocks before skipped, stopped
    after this one. Hooks on the block's sites fire as in a full pass."""
    kept: list[Any] = []
    block = lm.adapter.blocks(lm.model)[layer]
    handle = block.register_forward_hook(lambda module, args, output: kept.append(copy_output(output)))
    try:
        with run_from(lm, layer, previous) if layer > 0 else nullcontext():
            forward_until(lm.model, lm.adapter, layer, input_ids=batch.ids.to(lm.device),
                          attention_mask=batch.mask.to(lm.device), use_cache=False)
    finally:
        handle.remove()
    return kept[0]


def run_head(lm: LoadedModel, batch: Batch, last: Any) -> Any:
    """The model's output (final norm and head) on ``batch``, given ``last``, the last block's output on it."""
    n_layers = len(lm.adapter.blocks(lm.model))
    with run_from(lm, n_layers, last):
        return lm.model(input_ids=batch.ids.to(lm.device), attention_mask=batch.mask.to(lm.device), use_cache=False)


def carry(streamed: StreamedModel, batches: Sequence[Batch], at_block: Callable[[int], AbstractContextManager],
          states: HiddenStates, on_batch: Callable[[int, Batch], None] | None = None, head: bool = False, first: int = 0,
          finished: Callable[[int], None] | None = None, keep: int = -1, last: int | None = None) -> None:
    """One pass of ``batches`` through the blocks from ``first`` on, to block ``last`` (None: the last one; ``states``
    holding each batch's output of block ``first - 1``), block by block: around each block's batches the context
    ``at_block(layer)`` is open (the hooks that read the block's sites), ``on_batch(layer, batch)`` is called before
    each batch goes through it, and ``finished(layer)`` after the block (``states`` then hold its outputs). With
    ``head`` (and no ``last``), the batches then go through the final norm and head, inside ``at_block(n_layers)``.
    The blocks up to ``keep`` stay loaded until ``finished(keep)`` has returned (``blocks``)."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    with torch.no_grad():
        for layer in blocks(streamed, range(first, n_layers if last is None else last + 1), keep):
            with at_block(layer):
                for index, batch in enumerate(batches):
                    if on_batch is not None:
                        on_batch(layer, batch)
                    states.put(index, run_block(lm, layer, batch, states.get(index)))
            if finished is not None:
                finished(layer)
        if head:
            with at_block(n_layers):
                for index, batch in enumerate(batches):
                    if on_batch is not None:
                        on_batch(n_layers, batch)
                    run_head(lm, batch, states.get(index))


@dataclass(kw_only=True)
class Carried:
    """One stream of a lane pass: its ``key``, the ``context`` that makes its intervention while a batch goes through
    a block (given the batch: nothing, for the unmodified model's), the block it starts at, the batches it carries
    (indices), the last block it needs, and those batches' states."""

    key: str
    context: Callable[[Batch], AbstractContextManager]
    start: int
    batches: list[int]
    last: int
    states: HiddenStates


def carry_lanes(streamed: StreamedModel, batches: Sequence[Batch], until: Sequence[int],
                plan: Callable[[int, Callable[[int], Any]], list[Carried]], at_block: Callable[[int, Carried], AbstractContextManager],
                base: HiddenStates, on_batch: Callable[[Carried, int], None] | None = None,
                explained: Callable[[int], None] | None = None, finished: Callable[[int], None] | None = None,
                keep: int = -1) -> list[Carried]:
    """Interventions as lanes of one pass: each block's weights read once, for the unmodified model's batches and for
    every lane that has started. The unmodified lane (key "baseline", states ``base``) carries every batch, batch i
    to block ``until[i]``, and goes through each block first; then ``explained(layer)`` is called, then
    ``plan(layer, block_input)`` gives the lanes that start at this block (``block_input(i)``: batch i's unmodified
    output of the block before, None at block 0), which begin from those states. Around each lane's batches in a
    block, ``at_block(layer, lane)`` is open, ``on_batch(lane, i)`` is called before batch i goes through and
    ``context(batch)`` is open while it does; ``finished(layer)`` is called after the block. A lane stops after its
    block ``last``. The blocks up to ``keep`` stay loaded until block ``keep`` is done (``blocks``). Returns every
    lane, the unmodified one first, with the states of the last block each went through."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    lanes = [Carried(key="baseline", context=lambda batch: nullcontext(), start=0, batches=list(range(len(batches))),
                     last=n_layers - 1, states=base)]

    def through(lane: Carried, layer: int) -> None:
        with at_block(layer, lane):
            for index in lane.batches:
                if until[index] < layer:
                    continue
                if on_batch is not None:
                    on_batch(lane, index)
                with lane.context(batches[index]):
                    lane.states.put(index, run_block(lm, layer, batches[index], lane.states.get(index)))

    with torch.no_grad():
        for layer in blocks(streamed, range(n_layers), keep):
            # The unmodified inputs of this block, for the lanes that start here, as the baseline goes through it.
            inputs = {index: base.held(index) for index in range(len(batches)) if layer > 0 and until[index] >= layer}
            through(lanes[0], layer)
            if explained is not None:
                explained(layer)
            on_device = lambda index, inputs=inputs: None if inputs.get(index) is None else _to(inputs[index], lm.device)
            for lane in plan(layer, on_device):
                for index in lane.batches:
                    if layer > 0:
                        lane.states.put(index, inputs[index])
                lanes.append(lane)
            for lane in lanes[1:]:
                if lane.start <= layer <= lane.last:
                    through(lane, layer)
            if finished is not None:
                finished(layer)
    return lanes


def _to(value: Any, device: torch.device) -> Any:
    """A block output (its leading tensor, or a tuple led by one) with the tensor on ``device``."""
    return value.to(device) if isinstance(value, torch.Tensor) else (value[0].to(device), *value[1:])
