"""The layer scan of a streamed model: the corpus carried block by block (``capture.streaming``), each block's output
fed to the same recorder as the in-memory scan, so that the statistics are the same ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext

import torch

from ...capture.batches import pad_batch
from ...capture.blocks import BlockRecorder
from ...capture.expert_maxima import ExpertMaxima
from ...capture.streaming import Batch, carry
from ...models.checkpoint import StreamedModel
from .scan import CANDIDATES, LayerScan, block_recording, layer_scan, stream_slots


def corpus_batches(windows: Iterable[torch.Tensor], batch_size: int) -> list[Batch]:
    """The windows (token ids [1, n] each) in padded batches of ``batch_size``, in order, as the in-memory scan
    batches them."""
    batches, pending = [], []
    for index, ids in enumerate(windows):
        pending.append((index, ids))
        if len(pending) == batch_size:
            batches.append(_batch(pending))
            pending = []
    if pending:
        batches.append(_batch(pending))
    return batches


def _batch(chosen: list[tuple[int, torch.Tensor]]) -> Batch:
    ids, mask = pad_batch([one for _, one in chosen])
    return Batch(ids=ids, mask=mask, texts=torch.tensor([index for index, _ in chosen]))


def stream_layers(streamed: StreamedModel, windows: Iterable[torch.Tensor], candidates: int = CANDIDATES,
                  batch_size: int = 8, on_block: Callable[[int], None] | None = None) -> LayerScan:
    """``scan_layers`` on a streamed model: every block's output (with hyper-connections each stream, and the
    combination the next sublayer reads) in the same ``BlockRecorder``, a block's batches in corpus order, each
    block's weights read once. ``on_block(layer)`` is called as each block is done."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    slots = stream_slots(lm)
    recorder = BlockRecorder(n_layers * max(1, len(slots)), candidates, lm.device)
    maxima = ExpertMaxima(lm) if any(lm.at(layer).moe is not None for layer in range(n_layers)) else None
    batches = corpus_batches(windows, batch_size)

    def start(layer: int, batch: Batch) -> None:
        recorder.finish()
        recorder.start(batch.texts, batch.mask.flatten().nonzero().flatten(), batch.ids.shape[1])
        if maxima is not None:
            maxima.real = batch.mask.flatten().bool() if not bool(batch.mask.all()) else None

    @contextmanager
    def at_block(layer: int):
        with block_recording(lm, recorder, [layer] if layer < n_layers else [], layer == n_layers, slots):
            yield
            recorder.finish()
        if on_block is not None and layer < n_layers:
            on_block(layer)

    with maxima.recording() if maxima is not None else nullcontext():
        carry(streamed, batches, at_block, on_batch=start, head=bool(slots))
    histograms, tops = recorder.sync()
    return layer_scan(lm, histograms, tops, maxima, streamed.dtype, slots)
