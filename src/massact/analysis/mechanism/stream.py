"""The mechanism of a streamed model (``models.checkpoint``), in two more passes over the kept texts alone, each
block's weights read once per pass:

1. the lifelines (every block's sites at each dim's main carrier), the token view (every block's stream at the
   strongest dims, on a few texts) and the compression valley's readings (every block's stream on a few texts);
2. the events the lifelines name, each explained as the pass reaches its block, while that block's weights are
   loaded, and the birth block's state (``EventPass``; with verification, this pass also carries the causal stage's
   lanes: ``analysis.causal.stream``).

With hyper-connections the first pass reads, at each carrier, every block's streams and the weights that write and
mix them (``capture.streams.streams_probing``), and the second each lifeline's stream origins, the MLPs they name and
the birth state in the lifeline's stream (``StreamEventPass``).

Each number is the one the in-memory mechanism computes: the same reads, through the same hooks, of the same block
outputs, and the same functions build the results from them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...capture.hooks import tap
from ...capture.probe import at_dims, at_positions, probing
from ...capture.qk import QkEnergy
from ...capture.streaming import Batch, HiddenStates, carry
from ...capture.streams import at_rows, streams_probing, with_identity
from ...models.checkpoint import StreamedModel
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..detect.results import Findings
from ..function.qk import qk_from, qk_layouts, qk_texts
from ..function.results import QkValues
from ..function.valley import Reading, block_medians, read_block, valley_texts
from .explain import (
    Event,
    Probes,
    event_positions,
    explain,
    open_stream,
    pick_events,
    split_opened,
    state_of,
    stream_birth,
    stream_openings,
    token_values,
    token_view,
)
from .lifeline import (
    carrier_groups,
    lifeline_sites,
    lifelines,
    main_carrier,
    origin_layers,
    stream_carrier,
    stream_carrier_groups,
    stream_lifeline_reads,
    stream_lifelines,
    writers,
)
from .results import Mechanism, StreamOrigin
from .streams import origin_at

if TYPE_CHECKING:  # the trigger reads the events' pass: only its type here
    from ..trigger.stream import StreamedTrigger


@dataclass(kw_only=True)
class _Pass:
    """One pass of ``texts`` (each a batch of its own) through every block: ``running`` is the text going through the
    block now."""

    streamed: StreamedModel
    texts: list[int]
    inputs: dict[int, torch.Tensor]
    folder: Path
    running: int = -1

    def run(self, at_block: Callable[[int], AbstractContextManager], finished: Callable[[int], None] | None = None,
            reader: EventPass | None = None, keep: int = -1) -> None:
        """The pass, ``reader.running`` (where given) kept to the text going through as ``running`` is; the blocks up
        to ``keep`` stay loaded until ``finished(keep)`` has returned."""
        lm = self.streamed.lm
        batches = [Batch(ids=self.inputs[t], mask=torch.ones_like(self.inputs[t]), texts=torch.tensor([t])) for t in self.texts]

        def on_batch(layer: int, batch: Batch) -> None:
            self.running = int(batch.texts[0])
            if reader is not None:
                reader.running = self.running

        # A few texts: their hidden states stay in memory (the file is only named).
        states = HiddenStates(device=lm.device, device_bytes=2**62, host_bytes=2**62, path=self.folder / "mechanism-hidden.bin")
        carry(self.streamed, batches, at_block, states, on_batch=on_batch, finished=finished, keep=keep)


@torch.no_grad()
def explain_streamed(streamed: StreamedModel, events: EventPass, folder: Path) -> Mechanism:
    """The second of the streamed mechanism's passes, on its own: ``events`` explained (see ``streamed_lifelines``),
    and its trigger run (``EventPass.trigger``), the blocks up to its last kept loaded until it has."""
    run = _Pass(streamed=streamed, texts=events.texts, inputs=events.inputs, folder=folder)
    trigger = events.trigger

    def finished(layer: int) -> None:
        events.finished(layer)
        if trigger is not None:
            trigger.finished(layer)

    run.run(events.at_block, finished, events, -1 if trigger is None else trigger.keep)
    return events.mechanism()


@torch.no_grad()
def streamed_lifelines(streamed: StreamedModel, findings: Findings, inputs: dict[int, torch.Tensor], settings: ScanSettings,
                       warnings: list[str], folder: Path) -> EventPass:
    """``pipeline.mechanism_stage`` on a streamed model (one residual stream), without the super experts (the corpus
    pass's): its first pass (the lifelines and the token view), and what the second reads (``EventPass``: a pass of
    its own, ``explain_streamed``, or along the causal stage's). Checks that fail their second computation are
    appended to ``warnings``."""
    lm = streamed.lm
    if lm.adapter.hyper is not None:
        return _streamed_stream_lifelines(streamed, findings, inputs, settings, warnings, folder)
    groups = carrier_groups(findings)
    strongest, texts = token_view(findings.dims, [(d.dim, main_carrier(findings.massive, d.dim).text) for d in findings.dims],
                                  inputs)
    reads, view, readings, qk = _read_lifelines(streamed, groups, strongest, texts, inputs, folder, findings)
    lines = lifelines(lm, findings, inputs, reads)
    events = pick_events(findings.dims, findings.massive, lines)
    strongest_dim = max(findings.dims, key=lambda d: abs(d.max_value)).dim
    birth = next((e for e in events if e.dim == strongest_dim and e.role == "birth"), None)
    return EventPass(lm=lm, findings=findings, inputs=inputs, settings=settings, warnings=warnings, lines=lines, view=view,
                     events=events, birth=birth, readings=readings, qk=qk)


def _streamed_stream_lifelines(streamed: StreamedModel, findings: Findings, inputs: dict[int, torch.Tensor],
                               settings: ScanSettings, warnings: list[str], folder: Path) -> StreamEventPass:
    """``streamed_lifelines`` with hyper-connections: each dim's lifeline in its carrier's stream, the token view in
    those streams, and what the second pass reads (``StreamEventPass``)."""
    lm = streamed.lm
    followed = {summary.dim: stream_carrier(findings, summary.dim) for summary in findings.dims}
    strongest, texts = token_view(findings.dims, [(dim, carrier.text) for dim, (carrier, _) in followed.items()], inputs)
    reads, view, readings, qk = _read_lifelines(streamed, stream_carrier_groups(findings), strongest, texts, inputs, folder,
                                                findings, [followed[dim][1] for dim in strongest])
    lines = stream_lifelines(lm, findings, inputs, reads)
    return StreamEventPass(lm=lm, findings=findings, inputs=inputs, settings=settings, warnings=warnings, lines=lines,
                           view=view, events=[], birth=None, readings=readings, qk=qk)


@torch.no_grad()
def streamed_valley(streamed: StreamedModel, findings: Findings, inputs: dict[int, torch.Tensor],
                    folder: Path) -> tuple[dict[tuple[int, int], Reading], QkValues]:
    """The compression valley's readings and the Q/K section alone, in one pass over their texts: where no mechanism
    pass runs (nothing massive, or hyper-connections)."""
    return _read_lifelines(streamed, {}, [], [], inputs, folder, findings)[2:]


def _read_lifelines(streamed: StreamedModel, groups: dict[tuple[int, int], list[int]], strongest: list[int], texts: list[int],
                    inputs: dict[int, torch.Tensor], folder: Path, findings: Findings, streams: list[int] | None = None
                    ) -> tuple[dict, dict[int, torch.Tensor], dict[tuple[int, int], Reading], QkValues]:
    """``read_lifelines`` of every carrier group ((text, position) -> dims; with hyper-connections each block's
    ``stream_lifeline_reads``), ``stream_dims`` of the token view's ``texts`` at its ``strongest`` dims (in
    ``streams``, with hyper-connections), the compression valley's readings of its texts (``valley_texts`` of
    ``findings``) and the Q/K section's concentration on its texts (``qk_texts``, each a batch of its own), in one
    pass."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    hyper = lm.adapter.hyper is not None
    sites = lifeline_sites(lm) if groups and not hyper else (lm.adapter.stream,)
    kept: dict[tuple, torch.Tensor] = {}
    probed: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}  # (text, position, block) -> its stream reads
    measured, medians = valley_texts(findings, inputs), block_medians(lm, findings)
    readings: dict[tuple[int, int], Reading] = {}
    layouts = qk_layouts(lm)
    read_layouts = {layer: layout for layer, layout in layouts.items() if layout.queries is not None}
    energy = QkEnergy(lm, read_layouts)
    queried = qk_texts(inputs)
    run = _Pass(streamed=streamed, texts=list(dict.fromkeys([text for text, _ in groups] + texts + measured + queried)),
                inputs=inputs, folder=folder)

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        for (text, position), dims in groups.items():
            if text == run.running and not hyper:
                index = torch.tensor(dims, device=hidden.device)
                kept[text, position, layer, site] = hidden[0, position].index_select(0, index).double().cpu()
        if site == lm.adapter.stream and run.running in texts:
            kept[run.running, layer] = at_dims(hidden[0], strongest, streams)
        if site == lm.adapter.stream and run.running in measured:  # one text a batch: every position is real
            readings[run.running, layer] = read_block(hidden[0].detach(), medians[layer], findings)

    def keep_streams(layer: int, name: str, tensor: torch.Tensor) -> None:
        for (text, position), dims in groups.items():
            if text == run.running:  # narrowed as it comes: what the lifelines read of the block
                probed.setdefault((text, position, layer), {}).update(stream_lifeline_reads({name: at_rows(tensor, [position])}, dims))

    # This block's sites alone: the blocks before it stand in for themselves (``prefix.run_from``), and hooks on them
    # would read the wrong input.
    def at_block(layer: int) -> AbstractContextManager:
        stack = ExitStack()
        stack.enter_context(tap(lm.model, lm.adapter, [(layer, site) for site in sites if site in lm.at(layer).sites], keep))
        if hyper and groups:
            stack.enter_context(streams_probing(lm, [layer], keep_streams))
        stack.enter_context(energy.reading([layer]))
        return stack

    run.run(at_block, reader=_Queried(energy=energy, inputs={text: inputs[text] for text in queried}))
    # counted as ``measure`` counts them: none where no block's queries and keys are read
    tokens = sum(inputs[text].shape[1] for text in queried) if read_layouts else 0
    qk = qk_from(layouts, energy.result(), len(queried), tokens)[0]
    reads = {}
    for (text, position), dims in groups.items():
        if hyper:
            reads[text, position] = with_identity(lm, {layer: probed[text, position, layer] for layer in range(n_layers)}, 1)
            continue
        none = torch.zeros(len(dims), dtype=torch.float64)
        reads[text, position] = {site: torch.stack([kept.get((text, position, layer, site), none) for layer in range(n_layers)])
                                 for site in sites}
    return reads, {text: torch.stack([kept[text, layer] for layer in range(n_layers)]) for text in texts}, readings, qk


@dataclass(kw_only=True)
class _Queried:
    """The pass's Q/K sums counting only the texts the section reads: each of them a batch of its own, every position
    real."""

    energy: QkEnergy
    inputs: dict[int, torch.Tensor]

    @property
    def running(self) -> int:
        return -1

    @running.setter
    def running(self, text: int) -> None:
        self.energy.valid = torch.ones_like(self.inputs[text]) if text in self.inputs else None


@dataclass(kw_only=True)
class EventPass:
    """The events the lifelines name, each explained as a pass reaches its block, while that block's weights are
    loaded: the pass carries ``texts`` (the events' and the birth's, each a batch of its own), opens
    ``at_block(layer)`` around a block's batches, sets ``running`` to the text going through, and calls
    ``finished(layer)`` after the block. ``mechanism()`` is the mechanism explained so far: after the pass, all of it.
    The ``birth`` event's block output on its text [positions, d_model] gives the birth state."""

    lm: LoadedModel
    findings: Findings
    inputs: dict[int, torch.Tensor]
    settings: ScanSettings
    warnings: list[str]
    lines: list
    view: dict[int, torch.Tensor]
    events: list[Event]
    birth: Event | None
    readings: dict = field(default_factory=dict)  # the compression valley's, taken in the first pass
    qk: QkValues | None = None  # the Q/K section's concentration, taken in the first pass
    running: int = -1
    super_experts: object = None  # the corpus pass's, set by the caller
    # The trigger, run in this pass once its last block is done (``analysis.trigger.stream``), set by the caller.
    trigger: StreamedTrigger | None = None
    probes: Probes = field(default_factory=dict)
    found: dict[int, tuple] = field(default_factory=dict)
    output: list[torch.Tensor] = field(default_factory=list)

    @property
    def texts(self) -> list[int]:
        return list(dict.fromkeys([e.text for e in self.events] + ([self.birth.text] if self.birth else [])))

    def at_block(self, layer: int) -> AbstractContextManager:
        lm, birth, wanted = self.lm, self.birth, event_positions(self.events)
        stack = ExitStack()
        if any(key[1] == layer for key in wanted):
            def keep(site: str, tensor: torch.Tensor) -> None:
                positions = wanted.get((self.running, layer))
                if positions is not None:
                    self.probes.setdefault((self.running, layer), (positions, {}))[1][site] = at_positions(tensor, positions)

            stack.enter_context(probing(lm, layer, keep))
        if birth is not None and layer == birth.layer:
            def whole(_, __, hidden: torch.Tensor) -> None:
                if self.running == birth.text:
                    self.output.append(hidden[0].detach().float().cpu())

            stack.enter_context(tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], whole))
        return stack

    def finished(self, layer: int) -> None:
        for number in (number for number, event in enumerate(self.events) if event.layer == layer):
            self.found[number] = explain(self.lm, [self.events[number]], self.probes, self.findings, self.settings, self.warnings)

    def mechanism(self, whole: bool = True) -> Mechanism:
        """The mechanism explained so far; without ``whole``, not its birth state and token view (what a pass under
        way reads of it)."""
        lm, findings, birth = self.lm, self.findings, self.birth
        out: tuple[list, list, list, list] = ([], [], [], [])
        for number in range(len(self.events)):  # the results in the events' order
            for kept, made in zip(out, self.found.get(number, ([], [], [], []))):
                kept.extend(made)
        origins, anatomies, attributions, experts = out
        state = (state_of(self.output[0], birth.layer, birth.text, "", findings.massive, findings.tokens)
                 if whole and birth is not None and self.output else None)
        view = token_values(lm, self.inputs, dims=findings.dims, lifelines=self.lines, read=self.view) if whole and self.lines else None
        return Mechanism(lifelines=self.lines, origin=origins, anatomy=anatomies, attribution=attributions, experts=experts,
                         super_experts=self.super_experts, birth_state=state, token_values=view)


@dataclass(kw_only=True)
class StreamEventPass(EventPass):
    """``EventPass`` with hyper-connections: as the pass reaches each block, the stream origin of every lifeline
    that reads one there (``origin_layers``), and where that origin's carrier is the MLP at a block the lifeline
    names as a writer, the MLP opened (``open_stream``); the birth block's output in the stream of the strongest dim's
    lifeline gives the birth state. Read through the in-memory probes' hooks (``streams_probing``, ``probing``) and
    built by the in-memory functions."""

    origins: dict[tuple[int, int], StreamOrigin] = field(default_factory=dict)  # (dim, block) -> its stream origin
    opened: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (dim, block) -> ``open_stream``'s result
    stream_probes: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)  # (text, block) -> its probe

    @property
    def texts(self) -> list[int]:
        return list(dict.fromkeys(line.text for line in self.lines))

    def _positions(self, layer: int, opening: bool) -> dict[int, list[int]]:
        """text -> the positions probed at block ``layer``: the carriers of the lifelines whose stream origin is read
        there, or (``opening``) that name it as a writer."""
        at = [line for line in self.lines
              if layer in ({at for at, _ in writers(line)} if opening else set(origin_layers(line)))]
        return {text: sorted({line.position for line in at if line.text == text}) for text in dict.fromkeys(line.text for line in at)}

    def at_block(self, layer: int) -> AbstractContextManager:
        lm, stack = self.lm, ExitStack()
        origins, openings = self._positions(layer, False), self._positions(layer, True)
        if origins:
            def keep(_, name: str, tensor: torch.Tensor) -> None:
                if self.running in origins:
                    self.stream_probes.setdefault((self.running, layer), {})[name] = at_rows(tensor, origins[self.running])

            stack.enter_context(streams_probing(lm, [layer], keep))
        if openings:
            def keep_block(site: str, tensor: torch.Tensor) -> None:
                if self.running in openings:
                    self.probes.setdefault((self.running, layer), (openings[self.running], {}))[1][site] = \
                        at_positions(tensor, openings[self.running])

            stack.enter_context(probing(lm, layer, keep_block))
        birth, text, stream = stream_birth(self.findings.dims, self.lines) if self.lines else (-1, -1, "")
        if layer == birth:
            def whole(_, __, hidden: torch.Tensor) -> None:
                if self.running == text:
                    self.output.append(hidden[0].detach().float().cpu())

            stack.enter_context(tap(lm.model, lm.adapter, [(layer, f"{lm.adapter.stream}.{stream}")], whole))
        return stack

    def finished(self, layer: int) -> None:
        lm, here = self.lm, []
        for text, positions in self._positions(layer, False).items():
            probe = with_identity(lm, {layer: self.stream_probes.pop((text, layer))}, len(positions))[layer]
            for line in (line for line in self.lines if line.text == text and layer in origin_layers(line)):
                origin = origin_at(lm, probe, layer, int(line.stream[1:]), line.dim, text, line.position,
                                   positions.index(line.position))
                self.origins[line.dim, layer] = origin
                here.append(origin)
        for line, at, phase, origin in stream_openings(self.lines, here):
            positions, vectors = self.probes[line.text, at]
            row = positions.index(line.position)
            self.opened[line.dim, at] = open_stream(lm, line, at, phase, origin, {site: v[row] for site, v in vectors.items()},
                                                    self.inputs, self.findings, self.settings, self.warnings)
        for text in self._positions(layer, True):
            self.probes.pop((text, layer), None)

    def mechanism(self, whole: bool = True) -> Mechanism:
        lm, findings = self.lm, self.findings
        origins = [self.origins[line.dim, layer] for line in self.lines for layer in origin_layers(line)
                   if (line.dim, layer) in self.origins]
        opened = [self.opened[line.dim, layer] for line, layer, _, _ in stream_openings(self.lines, origins)]
        anatomies, attributions, experts = split_opened(opened)
        state = None
        if whole and self.lines and self.output:
            layer, text, stream = stream_birth(findings.dims, self.lines)
            state = state_of(self.output[0], layer, text, stream, findings.massive, findings.tokens)
        view = token_values(lm, self.inputs, dims=findings.dims, lifelines=self.lines, read=self.view) if whole and self.lines else None
        return Mechanism(lifelines=self.lines, origin=[], anatomy=anatomies, attribution=attributions, experts=experts,
                         super_experts=self.super_experts, birth_state=state, token_values=view, streams=origins)
