"""The layer scan of a streamed model: the corpus carried block by block (``capture.streaming``), each block's output
fed to the same recorder as the in-memory scan, so that the statistics are the same ones.

A streamed pass is resumable at the last finished block: its state (the statistics, and where each batch's hidden
states are in the memory-mapped file) is written after every block whose states are all in that file, and on an
interruption, after the states held in memory are written to the file."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ...capture.batches import pad_batch
from ...capture.blocks import BlockRecorder
from ...capture.expert_maxima import ExpertMaxima
from ...capture.streaming import Batch, HiddenStates, carry
from ...models.checkpoint import StreamedModel, available_memory
from ...settings import ScanSettings
from .resume import scan_identity, state_refused
from .scan import CANDIDATES, LayerScan, block_recording, layer_scan, restore_state, save_state, stream_slots

STATE = "stream-state.pt"
STATES = "stream-hidden.bin"


@dataclass(frozen=True, kw_only=True)
class StreamPlace:
    """Where a streamed pass keeps the corpus's hidden states and its resumable state: ``folder`` (the output
    folder: the memory-mapped file and the state file, removed when the pass ends), ``device_bytes`` and
    ``host_bytes`` (what the hidden states may take on the model's device and in host memory before the file),
    ``resume`` (continue a pass whose state is in ``folder``) and ``identity`` (what that state must be of)."""

    folder: Path
    device_bytes: int = 0
    host_bytes: int = 2**62
    resume: bool = False
    identity: str = ""


def stream_place(streamed: StreamedModel, settings: ScanSettings, folder: Path, memory: int | None, resume: bool = False) -> StreamPlace:
    """Where a streamed scan of ``settings`` writing into ``folder`` keeps the corpus's hidden states: on a GPU while
    half its free memory allows, in host memory within ``memory`` (None: the memory available), beyond both in
    ``folder``; its ``identity`` (the model, its shards and the settings the statistics depend on) is what a resumed
    pass checks."""
    checkpoint = streamed.checkpoint
    held = checkpoint.size - sum(checkpoint.sizes[name] for names in checkpoint.blocks for name in names)
    largest = max((sum(checkpoint.sizes[name] for name in names) for names in checkpoint.blocks), default=0)
    limit = memory if memory is not None else available_memory() or 0
    # Two blocks are held at once (the one computing and the one read ahead), besides what is always loaded.
    host = max(0, int(0.8 * limit) - held - 2 * largest)
    device = streamed.lm.device
    on_device = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 0
    identity = scan_identity(streamed.lm, top_k=settings.top_k, max_length=settings.max_length, batch_size=settings.batch_size,
                             shards=sorted(checkpoint.sizes.items()))
    return StreamPlace(folder=folder, device_bytes=on_device, host_bytes=host, resume=resume, identity=identity)


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
                  batch_size: int = 8, on_block: Callable[[int], None] | None = None,
                  place: StreamPlace | None = None) -> LayerScan:
    """``scan_layers`` on a streamed model: every block's output (with hyper-connections each stream, and the
    combination the next sublayer reads) in the same ``BlockRecorder``, a block's batches in corpus order, each
    block's weights read once. ``on_block(layer)`` is called as each block is done. ``place``: where the hidden
    states go beyond the allowances and the pass's resumable state (None: in memory, not resumable)."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    slots = stream_slots(lm)
    recorder = BlockRecorder(n_layers * max(1, len(slots)), candidates, lm.device)
    maxima = ExpertMaxima(lm) if any(lm.at(layer).moe is not None for layer in range(n_layers)) else None
    batches = corpus_batches(windows, batch_size)
    place = place or StreamPlace(folder=Path("."))
    states = HiddenStates(device=lm.device, device_bytes=place.device_bytes if lm.device.type != "cpu" else 0,
                          host_bytes=place.host_bytes, path=place.folder / STATES)
    digest = hashlib.sha256(f"{place.identity}|{candidates}|{batch_size}|".encode())
    for batch in batches:
        digest.update(batch.ids.numpy().tobytes())
    fingerprint, path = digest.hexdigest(), place.folder / STATE
    first = 0
    if place.resume and path.is_file():
        saved = restore_state(path, recorder, place.identity, maxima)
        if saved["fingerprint"] != fingerprint or not isinstance(saved.get("states"), dict):
            raise state_refused(path, "it is of other texts or settings")
        try:
            states.restore(saved["states"])
        except (ValueError, KeyError, TypeError) as error:
            raise state_refused(path, f"its hidden states are not whole ({error})") from None
        first = saved["done"]

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

    done = first

    def finished(layer: int) -> None:
        nonlocal done
        done = layer + 1
        if states.in_file():  # saving costs nothing more than the statistics: a kill then loses no block
            _save(path, done, fingerprint, recorder, place.identity, maxima, states)
        if on_block is not None:
            on_block(layer)

    try:
        with maxima.recording() if maxima is not None else nullcontext():
            carry(streamed, batches, at_block, states, on_batch=start, head=bool(slots), first=first, finished=finished)
    except KeyboardInterrupt:
        if done > first and not states.in_file():
            _save(path, done, fingerprint, recorder, place.identity, maxima, states)
        raise
    states.remove()
    path.unlink(missing_ok=True)
    histograms, tops = recorder.sync()
    return layer_scan(lm, histograms, tops, maxima, streamed.dtype, slots)


def _save(path: Path, done: int, fingerprint: str, recorder: BlockRecorder, identity: str, maxima: ExpertMaxima | None,
          states: HiddenStates) -> None:
    """The resumable state after ``done`` blocks: the statistics and the hidden states, all in their file."""
    save_state(path, done, fingerprint, recorder, identity, maxima, states=states.persist())
