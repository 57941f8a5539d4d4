"""The mechanism of a streamed model (``models.checkpoint``), in two more passes over the kept texts alone, each
block's weights read once per pass:

1. the lifelines (every block's sites at each dim's main carrier), the token view (every block's stream at the
   strongest dims, on a few texts) and the compression valley's readings (every block's stream on a few texts);
2. the events the lifelines name, each explained as the pass reaches its block, while that block's weights are
   loaded, and the birth block's state.

Each number is the one the in-memory mechanism computes: the same reads, through the same hooks, of the same block
outputs, and the same functions build the results from them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ...capture.hooks import tap
from ...capture.probe import at_positions, probing
from ...capture.streaming import Batch, HiddenStates, carry
from ...models.checkpoint import StreamedModel
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..detect.results import Findings
from ..function.valley import Reading, block_medians, read_block, valley_texts
from .explain import Event, Probes, event_positions, explain, pick_events, state_of, token_values, token_view
from .lifeline import carrier_groups, lifeline_sites, lifelines, main_carrier
from .results import Mechanism


@dataclass(kw_only=True)
class _Pass:
    """One pass of ``texts`` (each a batch of its own) through every block: ``running`` is the text going through the
    block now."""

    streamed: StreamedModel
    texts: list[int]
    inputs: dict[int, torch.Tensor]
    folder: Path
    running: int = -1

    def run(self, at_block: Callable[[int], AbstractContextManager], finished: Callable[[int], None] | None = None) -> None:
        lm = self.streamed.lm
        batches = [Batch(ids=self.inputs[t], mask=torch.ones_like(self.inputs[t]), texts=torch.tensor([t])) for t in self.texts]

        def on_batch(layer: int, batch: Batch) -> None:
            self.running = int(batch.texts[0])

        # A few texts: their hidden states stay in memory (the file is only named).
        states = HiddenStates(device=lm.device, device_bytes=2**62, host_bytes=2**62, path=self.folder / "mechanism-hidden.bin")
        carry(self.streamed, batches, at_block, states, on_batch=on_batch, finished=finished)


@torch.no_grad()
def streamed_mechanism(streamed: StreamedModel, findings: Findings, inputs: dict[int, torch.Tensor], settings: ScanSettings,
                       warnings: list[str], folder: Path) -> tuple[Mechanism, dict[tuple[int, int], Reading]]:
    """``pipeline.mechanism_stage`` on a streamed model (one residual stream), in two passes over the kept texts,
    without the super experts (the corpus pass's), and the compression valley's readings (``valley.read_valley``'s),
    taken in the first pass; checks that fail their second computation are appended to ``warnings``."""
    lm = streamed.lm
    groups = carrier_groups(findings)
    strongest, texts = token_view(findings.dims, [(d.dim, main_carrier(findings.massive, d.dim).text) for d in findings.dims],
                                  inputs)
    reads, view, readings = _read_lifelines(streamed, groups, strongest, texts, inputs, folder, findings)
    lines = lifelines(lm, findings, inputs, reads)
    events = pick_events(findings.dims, findings.massive, lines)
    strongest_dim = max(findings.dims, key=lambda d: abs(d.max_value)).dim
    birth = next((e for e in events if e.dim == strongest_dim and e.role == "birth"), None)
    origins, anatomies, attributions, experts, output = _explain(streamed, events, birth, inputs, findings, settings, warnings,
                                                                 folder)
    state = state_of(output, birth.layer, birth.text, "", findings.massive, findings.tokens) if birth is not None else None
    mechanism = Mechanism(lifelines=lines, origin=origins, anatomy=anatomies, attribution=attributions, experts=experts,
                          super_experts=None, birth_state=state,
                          token_values=token_values(lm, inputs, dims=findings.dims, lifelines=lines, read=view))
    return mechanism, readings


@torch.no_grad()
def streamed_valley(streamed: StreamedModel, findings: Findings, inputs: dict[int, torch.Tensor],
                    folder: Path) -> dict[tuple[int, int], Reading]:
    """The compression valley's readings alone, in one pass over its texts: where no mechanism pass runs (nothing
    massive, or hyper-connections)."""
    return _read_lifelines(streamed, {}, [], [], inputs, folder, findings)[2]


def _read_lifelines(streamed: StreamedModel, groups: dict[tuple[int, int], list[int]], strongest: list[int], texts: list[int],
                    inputs: dict[int, torch.Tensor], folder: Path,
                    findings: Findings) -> tuple[dict, dict[int, torch.Tensor], dict[tuple[int, int], Reading]]:
    """``read_lifelines`` of every carrier group ((text, position) -> dims), ``stream_dims`` of the token view's
    ``texts`` at its ``strongest`` dims and the compression valley's readings of its texts (``valley_texts`` of
    ``findings``), in one pass."""
    lm = streamed.lm
    n_layers = len(lm.adapter.blocks(lm.model))
    sites = lifeline_sites(lm) if groups else (lm.adapter.stream,)
    kept: dict[tuple, torch.Tensor] = {}
    measured, medians = valley_texts(findings, inputs), block_medians(lm, findings)
    readings: dict[tuple[int, int], Reading] = {}
    run = _Pass(streamed=streamed, texts=list(dict.fromkeys([text for text, _ in groups] + texts + measured)), inputs=inputs,
                folder=folder)

    def keep(layer: int, site: str, hidden: torch.Tensor) -> None:
        for (text, position), dims in groups.items():
            if text == run.running:
                index = torch.tensor(dims, device=hidden.device)
                kept[text, position, layer, site] = hidden[0, position].index_select(0, index).double().cpu()
        if site == lm.adapter.stream and run.running in texts:
            kept[run.running, layer] = hidden[0].detach().index_select(-1, torch.tensor(strongest, device=hidden.device)).float().cpu()
        if site == lm.adapter.stream and run.running in measured:  # one text a batch: every position is real
            readings[run.running, layer] = read_block(hidden[0].detach(), medians[layer], findings)

    # This block's sites alone: the blocks before it stand in for themselves (``prefix.run_from``), and hooks on them
    # would read the wrong input.
    run.run(lambda layer: tap(lm.model, lm.adapter, [(layer, site) for site in sites if site in lm.at(layer).sites], keep))
    reads = {}
    for (text, position), dims in groups.items():
        none = torch.zeros(len(dims), dtype=torch.float64)
        reads[text, position] = {site: torch.stack([kept.get((text, position, layer, site), none) for layer in range(n_layers)])
                                 for site in sites}
    return reads, {text: torch.stack([kept[text, layer] for layer in range(n_layers)]) for text in texts}, readings


def _explain(streamed: StreamedModel, events: list[Event], birth: Event | None, inputs: dict[int, torch.Tensor],
             findings: Findings, settings: ScanSettings, warnings: list[str], folder: Path) -> tuple:
    """``explain`` of ``events`` in one pass: each block with events probed as the pass reaches it, its events explained
    right after, while its weights are loaded (the results in the events' order); and the detection stream of the
    ``birth`` event's block on its text, [positions, d_model] (None without one)."""
    lm: LoadedModel = streamed.lm
    wanted = event_positions(events)
    probes: Probes = {}
    found: dict[int, tuple] = {}
    output: list[torch.Tensor] = []
    run = _Pass(streamed=streamed, texts=list(dict.fromkeys([e.text for e in events] + ([birth.text] if birth else []))),
                inputs=inputs, folder=folder)

    def at_block(layer: int) -> AbstractContextManager:
        stack = ExitStack()
        if any(key[1] == layer for key in wanted):
            def keep(site: str, tensor: torch.Tensor) -> None:
                positions = wanted.get((run.running, layer))
                if positions is not None:
                    probes.setdefault((run.running, layer), (positions, {}))[1][site] = at_positions(tensor, positions)

            stack.enter_context(probing(lm, layer, keep))
        if birth is not None and layer == birth.layer:
            def whole(_, __, hidden: torch.Tensor) -> None:
                if run.running == birth.text:
                    output.append(hidden[0].detach().float().cpu())

            stack.enter_context(tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], whole))
        return stack

    def finished(layer: int) -> None:
        for number in (number for number, event in enumerate(events) if event.layer == layer):
            found[number] = explain(lm, [events[number]], probes, findings, settings, warnings)

    run.run(at_block, finished)
    out: tuple[list, list, list, list] = ([], [], [], [])
    for number in range(len(events)):
        for kept, made in zip(out, found.get(number, ([], [], [], []))):
            kept.extend(made)
    return (*out, output[0] if output else None)
