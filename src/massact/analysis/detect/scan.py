"""The layer scan and massive activations sections: scan every block's residual output, detect massive activations, group them by dim."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...capture.batches import pad_batch
from ...capture.blocks import BlockRecorder
from ...capture.expert_maxima import ExpertMaxima
from ...capture.hooks import tap, tap_final
from ...capture.stats import LogHistogram, TopK
from ...errors import UsageError
from ...launch import launch
from ...models.loading import LoadedModel
from ...settings import Criterion
from ...writes import replace_whole
from .results import DimSummary, Entry, LayerStats, Massive, StreamStats
from .resume import read_state, state_refused

CANDIDATES = 512  # largest |a| kept per block; massive entries are a handful, so this bounds nothing real


@dataclass
class LayerScan:
    """Per block: a median sketch and the largest |a| (candidates for massive), plus the first non-finite value; in
    a mixture of experts, each expert's largest |output| (``experts``: routed [blocks, experts] and shared [blocks],
    -inf where none). Where a value is non-finite, what says why: the scan's ``dtype`` and the model's parameters and
    buffers holding inf or nan (``nonfinite_weights``: (name, how many of its entries))."""

    histograms: list[LogHistogram]
    tops: list[TopK]
    nonfinite: tuple[int, int, int, int] | None  # (layer, text, position, dim) of the first inf/nan
    experts: tuple[torch.Tensor, torch.Tensor] | None = None
    dtype: torch.dtype | None = None
    stream: str = "resid_out"  # the site every block is read at
    nonfinite_weights: list[tuple[str, int]] = field(default_factory=list)
    # With hyper-connections, each block has one histogram and top-k per slot: its output's streams ("s0", ...), then
    # "read", the combination of them the next sublayer (or the final norm) reads; () where the state is one stream.
    # ``histograms`` and ``tops`` are then by block, then slot; ``nonfinite``'s layer is a block.
    slots: tuple[str, ...] = ()

    def per_block(self) -> int:
        """How many statistics each block has: one, or one per slot."""
        return max(1, len(self.slots))

    def nonfinite_value(self) -> float | None:
        """The first non-finite value itself (inf, -inf or nan), None where every value is finite."""
        if self.nonfinite is None:
            return None
        layer, *at = self.nonfinite
        return next((value for value, labels in self.tops[layer].items() if labels == at), float("nan"))

    def medians(self) -> list[float]:
        """Each block's median |a| (with hyper-connections, over every stream of its output)."""
        per = self.per_block()
        if per == 1:
            return [histogram.quantile(0.5) for histogram in self.histograms]
        return [_merged(self.histograms[block * per : block * per + len(self.slots) - 1]).quantile(0.5)
                for block in range(len(self.histograms) // per)]

    def slot_medians(self) -> list[float]:
        """Each statistic's median |a|: one per block, or per block and slot."""
        return [histogram.quantile(0.5) for histogram in self.histograms]


def _merged(histograms: list[LogHistogram]) -> LogHistogram:
    """One histogram of all the entries of ``histograms``."""
    merged = LogHistogram(device=histograms[0].counts.device)
    for histogram in histograms:
        merged.merge(histogram)
    return merged


def stream_slots(lm: LoadedModel) -> tuple[str, ...]:
    """The slots a hyper-connection model's scan keeps per block (its streams, then "read"); () for one stream."""
    if lm.adapter.hyper is None:
        return ()
    return (*(f"s{stream}" for stream in range(lm.adapter.streams(lm.config))), "read")


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    """Where a corpus pass saves its merged state (``path``), every ``every`` batches; with ``resume``, a state found
    there is continued once ``identity`` (the model, dtype and settings: ``massact.analysis.detect.resume.scan_identity``)
    is checked to be the same."""

    path: Path
    every: int = 50
    resume: bool = False
    identity: str = ""


def scan_layers(
    lm: LoadedModel,
    windows: Iterable[torch.Tensor],
    candidates: int = CANDIDATES,
    on_window: Callable[[int], None] | None = None,
    batch_size: int = 8,
    state: Checkpointing | None = None,
) -> LayerScan:
    """Batched forward passes over ``windows`` (token ids [1, n] each, consumed lazily: memory does not grow with the
    corpus); hooks on every block's resid_out feed a ``BlockRecorder``: a histogram and a top-k per block, on
    device. Padding positions never enter a statistic. Labels name a window by its index in ``windows``.

    With ``state``, the merged state is written to its path (atomically) every ``state.every`` batches and removed at
    the end; with ``state.resume``, a state found there is loaded and the scan goes on after the windows it covers,
    once the token ids of those windows are checked to be the ones it saw, and its identity to be the same. Launched as
    several processes, each scans every world-th window and the statistics are merged with torch.distributed
    collectives.
    """
    checkpoint, every, resume, identity = (None, 50, False, "") if state is None else (state.path, state.every, state.resume,
                                                                                      state.identity)
    n_layers = len(lm.adapter.blocks(lm.model))
    slots = stream_slots(lm)
    recorder = BlockRecorder(n_layers * max(1, len(slots)), candidates, lm.device)
    maxima = ExpertMaxima(lm) if any(lm.at(layer).moe is not None for layer in range(n_layers)) else None
    rank, world = distributed_rank()
    if world > 1 and checkpoint is not None:
        checkpoint = checkpoint.with_name(f"{checkpoint.name}.rank{rank}-of-{world}")
    start, saved_fingerprint = 0, None
    if checkpoint is not None and resume and checkpoint.is_file():
        saved = restore_state(checkpoint, recorder, identity, maxima)
        start, saved_fingerprint = saved["done"], saved["fingerprint"]
    # Of the identity, the top-k size and every window this process scans.
    digest = hashlib.sha256(f"{identity}|{candidates}|{batch_size}|".encode())

    def forward(chosen: list[tuple[int, torch.Tensor]]) -> None:
        ids, mask = pad_batch([one for _, one in chosen])
        recorder.start(torch.tensor([index for index, _ in chosen]), mask.flatten().nonzero().flatten(), ids.shape[1])
        if maxima is not None:
            maxima.real = mask.flatten().bool() if not bool(mask.all()) else None
        lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
        recorder.finish()
        if on_window:
            for index, _ in chosen:
                on_window(index)

    seen, batches, pending = 0, 0, []
    recording = block_recording(lm, recorder, range(n_layers), True, slots)
    with torch.no_grad(), recording, (maxima.recording() if maxima is not None else nullcontext()):
        for index, ids in enumerate(windows):
            if index % world != rank:  # under torchrun / accelerate launch, each process takes every world-th window
                continue
            seen += 1
            digest.update(ids.numpy().tobytes() + b"|")
            if seen <= start:  # covered by the resumed state: only checked
                if seen == start and digest.hexdigest() != saved_fingerprint:
                    raise _other_scan(checkpoint)
                continue
            pending.append((index, ids))
            if len(pending) == batch_size:
                forward(pending)
                pending, batches = [], batches + 1
                if checkpoint is not None and batches % every == 0:
                    save_state(checkpoint, seen, digest.hexdigest(), recorder, identity, maxima)
        if pending:
            forward(pending)
    if seen < start:
        raise _other_scan(checkpoint)
    histograms, tops = recorder.sync()
    if world > 1:
        merge_across_processes(histograms, tops, maxima)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return layer_scan(lm, histograms, tops, maxima, lm.dtype, slots)


def layer_scan(lm: LoadedModel, histograms: list[LogHistogram], tops: list[TopK], maxima: ExpertMaxima | None,
               dtype: torch.dtype, slots: tuple[str, ...]) -> LayerScan:
    """The finished scan's ``LayerScan``, from its statistics: the first non-finite value (its layer a block, with
    hyper-connections) and, where there is one, the weights in memory that hold inf or nan."""
    nonfinite = first_nonfinite(tops)
    if nonfinite is not None and slots:
        nonfinite = (nonfinite[0] // len(slots), *nonfinite[1:])
    return LayerScan(histograms, tops, nonfinite, (maxima.routed.cpu(), maxima.shared.cpu()) if maxima else None, dtype=dtype,
                     stream=lm.adapter.stream, nonfinite_weights=nonfinite_weights(lm.model) if nonfinite is not None else [],
                     slots=slots)


def block_recording(lm: LoadedModel, recorder: BlockRecorder, layers: Iterable[int], final: bool, slots: tuple[str, ...]):
    """The hooks that feed ``recorder`` the output of each block of ``layers``: as it is, or with hyper-connections
    each stream of it (statistic block x slots + stream), then the combination the next block's attention reads
    (block L's "read" is block L + 1's attn_read; with ``final``, the last block's is what the final norm reads), in
    the order the forward pass makes them."""
    layers = list(layers)
    if not slots:
        sites = [(layer, lm.adapter.stream) for layer in layers]
        return tap(lm.model, lm.adapter, sites, lambda layer, _, hidden: recorder.add(layer, hidden))
    n_layers = len(lm.adapter.blocks(lm.model))
    per, streams = len(slots), len(slots) - 1

    def add(layer: int, site: str, hidden: torch.Tensor) -> None:
        if site == "attn_read":  # what block ``layer`` reads: the previous block's "read" slot
            recorder.add((layer - 1) * per + streams, hidden)
        else:
            for stream in range(streams):
                recorder.add(layer * per + stream, hidden[..., stream, :])

    sites = [(layer, lm.adapter.stream) for layer in layers] + [(layer, "attn_read") for layer in layers if layer > 0]
    hooks = tap(lm.model, lm.adapter, sites, add)
    if not final:
        return hooks
    return _both(hooks, tap_final(lm.model, lm.adapter, lambda hidden: recorder.add((n_layers - 1) * per + streams, hidden)))


@contextmanager
def _both(first, second):
    with first, second:
        yield


def nonfinite_weights(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, how many of its entries are inf or nan) for every parameter and buffer of ``model`` that holds one, in
    the model's order. Read only when a scan met a non-finite value: one pass over the weights. Weights that are not
    in memory (the meta device of an offloaded model) are not read."""
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                found.append((name, bad))
    return found


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) unless launched by torchrun or accelerate launch
    (``massact.launch``). The process group is set up here on first use: gloo on CPU, nccl on GPUs."""
    _, world = launch()
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def release_processes() -> None:
    """End this process's part in the process group once the statistics are merged. A process that exits with the
    group still up can abort in the collective library's threads (gloo: "terminate called without an active
    exception") while the first process is still explaining."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def merge_across_processes(histograms: list[LogHistogram], tops: list[TopK], maxima: ExpertMaxima | None = None) -> None:
    """Every process ends with the statistics of the whole corpus: histogram counts are summed, top-k lists are
    gathered and cut back to k (exactly what one process seeing every text would keep), experts' maxima maxed."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for histogram in histograms:
        dist.all_reduce(histogram.counts)
    if maxima is not None:
        dist.all_reduce(maxima.routed, op=dist.ReduceOp.MAX)
        dist.all_reduce(maxima.shared, op=dist.ReduceOp.MAX)
    for top in tops:
        values = torch.zeros(top.k, device=histograms[0].counts.device)
        labels = torch.full((top.k, 3), -1, dtype=torch.long, device=values.device)
        if top.values is not None:  # pad to k so every process sends the same shape
            values[: len(top.values)] = top.values.to(values.device)
            labels[: len(top.labels)] = top.labels.to(values.device)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_labels = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_values, values)
        dist.all_gather(all_labels, labels)
        gathered, tags = torch.cat(all_values), torch.cat(all_labels)
        real = tags[:, 0] >= 0
        top.clear()
        top.update(gathered[real], tags[real])


def save_state(path: Path, done: int, fingerprint: str, recorder: BlockRecorder, identity: str = "",
                maxima: ExpertMaxima | None = None, **more) -> None:
    """Write the scan state atomically: ``done`` (windows it covers), their ``fingerprint``, the scan's ``identity``,
    and the statistics' own ``state_dict()``: the recorder's (``blocks``) and the experts' maxima's (``experts``, None
    for a model without a mixture of experts), and ``more`` entries as they are. ``read_state`` and ``restore_state``
    read it back."""
    state = {**more,
        "done": done,
        "fingerprint": fingerprint,
        "identity": identity,
        "blocks": recorder.state_dict(),
        "experts": maxima.state_dict() if maxima is not None else None,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A kill mid-write leaves the previous state whole; a full disk or Ctrl-C leaves no half-written one.
        replace_whole(path, lambda partial: torch.save(state, partial), path.with_name(path.name + ".partial"))
    except OSError as error:
        raise UsageError(f"cannot write the scan state {path}: {error.strerror or error}") from None


def restore_state(path: Path, recorder: BlockRecorder, identity: str = "", maxima: ExpertMaxima | None = None) -> dict:
    """Restore the merged statistics into ``recorder`` and ``maxima`` (their ``load_state_dict``); returns the state
    read (``done``: how many windows, or blocks of a streamed pass, they cover; ``fingerprint``: of those windows). A
    file that is not a whole state of this scan is refused in one line (see ``read_state``; a statistic's field that
    does not fit is named)."""
    state = read_state(path)
    if state["identity"] != identity:
        raise _other_scan(path)
    if maxima is not None and state["experts"] is None:
        raise state_refused(path, "no experts' maxima of this model in it")
    if maxima is None and state["experts"] is not None:
        raise state_refused(path, "it holds experts' maxima, and the model has no mixture-of-experts block")
    for name, statistic in (("blocks", recorder), ("experts", maxima)):
        if statistic is not None:
            try:
                statistic.load_state_dict(state[name])
            except ValueError as error:  # names the field: "blocks: tops[3]: k: ..."
                raise state_refused(path, f"{name}: {error}") from None
    return state


def _other_scan(path: Path | None) -> UsageError:
    return UsageError(f"{path} is the state of another scan (other model, texts or settings); remove it or drop --resume")


def first_nonfinite(tops: list[TopK]) -> tuple[int, int, int, int] | None:
    """(layer, text, position, dim) of an inf or nan in the earliest block that has one. The top-k holds them:
    torch sorts nan and inf above every finite |a|."""
    for layer, top in enumerate(tops):
        for value, (text, position, dim) in top.items():
            if not math.isfinite(value):
                return layer, text, position, dim
    return None


def _entries(top: TopK, tokens: list[list[str]], top_k: int, stream: str = "") -> list[Entry]:
    return [Entry(value=value, text=t, position=p, token=tokens[t][p], dim=d, stream=stream) for value, (t, p, d) in top.items()[:top_k]]


def _ratio(entries: list[Entry], median: float) -> float:
    return abs(entries[0].value) / median if entries and median > 0 else float("nan")


def layer_stats(scan: LayerScan, tokens: list[list[str]], top_k: int) -> list[LayerStats]:
    """Each block's median, ratio and largest entries; with hyper-connections over all its streams (each entry
    naming its stream), with each stream's and the next read's own statistics in ``streams``."""
    stats, per = [], scan.per_block()
    medians, slot_medians = scan.medians(), scan.slot_medians()
    for layer, median in enumerate(medians):
        if per == 1:
            entries = _entries(scan.tops[layer], tokens, top_k)
            stats.append(LayerStats(layer=layer, median=median, ratio=_ratio(entries, median), top=entries))
            continue
        streams = []
        for slot, name in enumerate(scan.slots):
            entries = _entries(scan.tops[layer * per + slot], tokens, top_k, name)
            streams.append(StreamStats(stream=name, median=slot_medians[layer * per + slot],
                                       ratio=_ratio(entries, slot_medians[layer * per + slot]), top=entries))
        # over the streams themselves, not the read (a combination of them): by |a|, then the stream's order
        entries = sorted((e for one in streams[:-1] for e in one.top), key=lambda e: -abs(e.value))[:top_k]
        stats.append(LayerStats(layer=layer, median=median, ratio=_ratio(entries, median), top=entries, streams=streams))
    return stats


def detect(scan: LayerScan, tokens: list[list[str]], criterion: Criterion) -> list[Massive]:
    """Every candidate with |a| >= min_abs and |a| >= min_ratio x its block's median |a|, by block then |a|. With
    hyper-connections the criterion holds per stream (each stream's own median), and each entry names its stream;
    by block, then stream, then |a|."""
    found, per = [], scan.per_block()
    for slot, (median, top) in enumerate(zip(scan.slot_medians(), scan.tops)):
        stream = scan.slots[slot % per] if scan.slots else ""
        for value, (t, p, d) in top.items():
            if criterion.is_massive(value, median):
                found.append(Massive(layer=slot // per, text=t, position=p, token=tokens[t][p], dim=d, value=value,
                                     ratio=abs(value) / median, stream=stream))
    return found


def nonfinite_warning(scan: LayerScan) -> str | None:
    """The warning for the scan's first non-finite value (None where there is none), saying what made it.

    An inf is an overflow of the scan's dtype; only float16's range (65,504) is smaller than another format's, so only
    there does a dtype help. A NaN is no overflow where the weights hold non-finite values (they are named) or where
    the dtype has float32's range (bfloat16, float32); in float16 with finite weights it most likely comes from an
    intermediate value that overflowed (inf - inf, inf x 0)."""
    if scan.nonfinite is None:
        return None
    layer, text, position, dim = scan.nonfinite
    value = scan.nonfinite_value()
    dtype = str(scan.dtype).removeprefix("torch.") if scan.dtype is not None else "this dtype"
    kind = "NaN" if math.isnan(value) else "inf"
    where = f"non-finite activation ({kind}) first at block {layer}, text {text}, position {position}, dim {dim} (site {scan.stream})"
    weights = scan.nonfinite_weights
    if weights:
        names = ", ".join(f"{name} ({count:,} entr{'y' if count == 1 else 'ies'})" for name, count in weights[:3])
        more = f" and {len(weights) - 3} more" if len(weights) > 3 else ""
        # A float16 load turns a checkpoint's weight above 65,504 into inf: there the dtype may be the cause.
        cause = ("; where they are finite in the checkpoint, float16 cannot hold them: use bfloat16 or float32"
                 if scan.dtype == torch.float16 else "")
        return f"{where}: the model's weights hold inf or nan, in {names}{more}{cause}"
    if scan.dtype == torch.float16:
        what = "the value overflowed" if kind == "inf" else "most likely an intermediate value overflowed (inf - inf, inf x 0)"
        return f"{where}: {what} float16's largest finite value, 65,504; use bfloat16 or float32"
    if kind == "inf":
        return f"{where}: the value overflowed {dtype}'s largest finite value, {torch.finfo(scan.dtype or torch.float32).max:.2e}"
    return (f"{where}: a NaN in {dtype} is no overflow and no weight holds one: an operation of the model made it (0/0, inf - inf, "
            "the square root or log of a negative number), or its inputs hold one")


def scan_warnings(scan: LayerScan, massive: list[Massive], candidates: int = CANDIDATES) -> list[str]:
    """What the report must say about the scan itself: a non-finite value (``nonfinite_warning``: where, and what made
    it), and blocks whose massive entries filled every one of the ``candidates`` kept (only the largest are listed)."""
    warnings = []
    nonfinite = nonfinite_warning(scan)
    if nonfinite:
        warnings.append(nonfinite)
    full = [layer for layer in {m.layer for m in massive} if sum(m.layer == layer for m in massive) >= candidates]
    if full:
        warnings.append(f"blocks {sorted(full)} have more than {candidates} massive entries; only the largest are listed")
    return warnings


def _stream_order(name: str) -> tuple[int, int]:
    """The streams in order ("s0", "s1", ...), then "read"."""
    return (1, 0) if name == "read" else (0, int(name[1:]))


def group_dims(massive: list[Massive], n_layers: int) -> list[DimSummary]:
    """Per dim: first block where it is massive, every such block, and each block after which it is not massive."""
    summaries = []
    for dim in sorted({m.dim for m in massive}):
        entries = [m for m in massive if m.dim == dim]
        layers = sorted({m.layer for m in entries})
        removed = [layer + 1 for layer in layers if layer + 1 not in layers and layer + 1 < n_layers]
        tokens = list(dict.fromkeys(m.token for m in entries))
        streams = sorted({m.stream for m in entries if m.stream}, key=_stream_order)
        summaries.append(DimSummary(dim=dim, born_at=layers[0], persists=layers, removed_at=removed,
                                    max_value=max((m.value for m in entries), key=abs), tokens=tokens, streams=streams))
    return summaries
