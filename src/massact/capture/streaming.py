"""The corpus carried through a model one block at a time, the loops turned around: blocks outside, batches inside.

Each block's weights are read from the checkpoint once per pass, when the pass reaches it (the next block's are read
in a thread while this one computes), every batch of the corpus goes through it, and the weights are released. Each
batch's output of the block before stands in for the blocks before it (``prefix.run_from``), so the block computes
what the model in memory computes, with the arguments the model's own forward gives it (masks, rotary positions,
per-layer inputs); hooks on the block's sites see what they see in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
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


def blocks(streamed: StreamedModel, layers: Sequence[int]) -> Iterator[int]:
    """Yield each block of ``layers`` with its weights loaded on the model's device, releasing it after the caller's
    step; the next block's tensors are read in a thread meanwhile."""
    checkpoint, lm = streamed.checkpoint, streamed.lm
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(checkpoint.read, checkpoint.blocks[layers[0]]) if layers else None
        for step, layer in enumerate(layers):
            tensors = pending.result()
            if step + 1 < len(layers):
                pending = reader.submit(checkpoint.read, checkpoint.blocks[layers[step + 1]])
            checkpoint.load(lm.model, tensors, streamed.dtype, lm.device)
            del tensors
            try:
                yield layer
            finally:
                release(lm.adapter.blocks(lm.model)[layer])
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
          on_batch: Callable[[int, Batch], None] | None = None, head: bool = False) -> list[Any]:
    """One pass of ``batches`` through every block, block by block: around each block's batches the context
    ``at_block(layer)`` is open (the hooks that read the block's sites), and ``on_batch(layer, batch)`` is called before
    each batch goes through it. With ``head``, the batches then go through the final norm and head, inside
    ``at_block(n_layers)``. Returns the last block's outputs, one per batch (each batch's hidden states are kept, on the
    model's device, from one block to the next)."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    outputs: list[Any] = [None] * len(batches)
    with torch.no_grad():
        for layer in blocks(streamed, range(n_layers)):
            with at_block(layer):
                for index, batch in enumerate(batches):
                    if on_batch is not None:
                        on_batch(layer, batch)
                    outputs[index] = run_block(lm, layer, batch, outputs[index])
        if head:
            with at_block(n_layers):
                for index, batch in enumerate(batches):
                    if on_batch is not None:
                        on_batch(n_layers, batch)
                    run_head(lm, batch, outputs[index])
    return outputs
