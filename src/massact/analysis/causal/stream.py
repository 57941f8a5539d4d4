"""The causal stage of a streamed model (``models.checkpoint``), in the pass that explains the mechanism's events, each
block's weights read once: the interventions are lanes of that pass (``capture.streaming.carry_lanes``). The
unmodified lane carries the evaluation windows, the carriers' texts and the input dependence's texts, and explains each
block's events as it goes through the block; then the interventions that start there are planned from the block's
weights and events (the same ``plan_verification``, super-weight ``search`` and ``pruning_lanes`` as in memory), and
each becomes a lane that carries, from that block on, the windows it is scored on and the texts it reads. After the
last block every scored lane goes through the final norm and head.

The rows, claims and steps are then built from the lanes' results by the functions that build them in memory, so each
number is the one the in-memory stage computes. Not measured here: the attention sinks, which the report says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...capture.batches import pad_batch
from ...capture.edits import coordinate, set_weight
from ...capture.hooks import tap
from ...capture.prefix import run_from
from ...capture.probe import probe_block
from ...capture.streaming import Batch, Carried, HiddenStates, carry_lanes
from ...models.checkpoint import StreamedModel
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..evaluation.mlm import masked_windows, next_token_windows
from ..evaluation.perplexity import EvalText, eval_windows
from ..evaluation.windows import Evaluation
from ..mechanism.results import Mechanism, SuperWeight
from ..mechanism.stream import EventPass
from .expert_pruning import pruning_from, pruning_lanes
from .output_effects import Edit, output_effects
from .results import Causal, EmbeddingChange, InputDependence, OutputEffect
from .superweights import search, step_from, step_target
from .verification import (
    Lane,
    Measured,
    Plan,
    Read,
    dependence_from,
    dependence_groups,
    dependence_inputs,
    plan_verification,
    read_group,
    verification_from,
)

HIDDEN = "causal-hidden"  # the lanes' memory-mapped files in the output folder, one per lane: NAME-<lane>.bin


class LaneEvaluation(Evaluation):
    """The evaluation windows scored from a lane pass: a lane's score is the final norm and head on the states its
    windows left the last block with (``finals``: lane key -> batch index -> that state). ``lane(key)`` picks the lane
    that ``logits``, ``score`` and the output effects read; outside it, the unmodified one."""

    def __init__(self, lm: LoadedModel, scored, text: EvalText):
        super().__init__(lm, scored, (), text)
        self.layers = len(lm.adapter.blocks(lm.model))
        self.finals: dict[str, Callable[[int], Any]] = {}
        self.selected = "baseline"
        self._index = {id(batch): number for number, batch in enumerate(self.batches)}

    @contextmanager
    def lane(self, key: str) -> Iterator[None]:
        before, self.selected = self.selected, key
        try:
            yield
        finally:
            self.selected = before

    def block_input(self, batch, start: int) -> Any:
        return self.finals[self.selected](self._index[id(batch)])

    def unmodified(self):
        total = 0.0
        for batch in self.batches:
            with self.lane("baseline"):
                log_p, target = self.log_probs(batch, self.layers)
            total += float(torch.nn.functional.nll_loss(log_p, target, reduction="sum"))
            yield batch, log_p, target
        self._baseline_nll = total


@dataclass(kw_only=True)
class _Wanted:
    """What one lane measures, merged over every planned lane with its target: the context, start block, reads,
    whether it is scored, and whether its output effects are measured."""

    context: Callable[[], AbstractContextManager]
    start: int
    reads: set[Read] = field(default_factory=set)
    scored: bool = False


@dataclass(kw_only=True)
class _Results:
    """A finished lane pass, as ``verification.Measure`` reads it: each lane's reads by block, the scoring, the
    output effects of the plan's edits and the input dependence."""

    evaluation: LaneEvaluation
    values: dict[tuple[str, Read], dict[int, float]]
    dependence_rows: list[InputDependence]
    unmodified: Callable[[Read], dict[int, float]]  # the unmodified lane's reads

    @property
    def baseline(self) -> float:
        return self.evaluation.baseline

    def measure(self, lane: Lane) -> Measured:
        values = {read: self.unmodified(read) if lane.target == "baseline" else self.values[lane.target, read] for read in lane.reads}
        ppl = None
        if lane.scored:
            with self.evaluation.lane(lane.target):
                ppl = self.evaluation.score(self.evaluation.layers, key=lane.target)
        return Measured(values=values, perplexity=ppl)

    def effects(self, edits: list[Edit]) -> tuple[list[OutputEffect], list[EmbeddingChange]]:
        evaluation = self.evaluation
        picked = [Edit(e.name, e.target, lambda target=e.target: evaluation.lane(target), evaluation.layers) for e in edits]
        return output_effects(evaluation.lm, evaluation, picked), []

    def dependence(self) -> list[InputDependence]:
        return self.dependence_rows


@torch.no_grad()
def streamed_causal(streamed: StreamedModel, events: EventPass, settings: ScanSettings, text: EvalText, folder: Path,
                    device_bytes: int = 0, host_bytes: int = 2**62,
                    on_block: Callable[[int], None] | None = None) -> tuple[Mechanism, Causal]:
    """The mechanism's second pass (``events``: the events the lifelines name, explained as the pass reaches them) and
    ``pipeline.causal_stage`` of a streamed model with massive dims, in one pass (``on_block(layer)`` as each block
    is done): the interventions with their output effects and the input dependence, the super weights zeroed one by
    one and a mixture's super experts pruned against a random control (without their attention on the sink tokens).
    A block's interventions are planned from its events, explained as the unmodified lane has gone through it.
    ``device_bytes``, ``host_bytes``: what the lanes' hidden states may take, all together, on the model's device and
    in host memory before their files in ``folder``."""
    lm, findings, inputs = streamed.lm, events.findings, events.inputs
    mechanism = events.mechanism(whole=False)
    n_layers = len(lm.adapter.blocks(lm.model))
    scored = masked_windows(lm, text.text) if lm.adapter.encoder else next_token_windows(eval_windows(lm, text.text))
    evaluation = LaneEvaluation(lm, scored, text)
    batches = [Batch(ids=b.ids, mask=b.mask, texts=torch.tensor([-1])) for b in evaluation.batches]
    windows = list(range(len(batches)))
    carriers = sorted({line.text for line in mechanism.lifelines} | set(events.texts))
    carrier_batch, text_of = {}, {}
    for number in carriers:
        carrier_batch[number], text_of[len(batches)] = len(batches), number
        batches.append(Batch(ids=inputs[number], mask=torch.ones_like(inputs[number]), texts=torch.tensor([number])))
    births = sorted({d.born_at for d in findings.dims})
    ids = dependence_inputs(lm, text.text, findings.texts)
    groups = dependence_groups(ids)
    grouped = {}
    for group in groups:
        grouped[len(batches)] = group
        padded, mask = pad_batch([ids[i] for i in group])  # right padding: every real token is computed as alone
        batches.append(Batch(ids=padded, mask=mask, texts=torch.tensor(group)))
    until = [n_layers - 1] * len(windows) + [n_layers - 1] * len(carriers) + [max(births)] * len(groups)

    pool = {"device": 0, "host": 0, "file": 0}
    states = lambda name: HiddenStates(device=lm.device, device_bytes=device_bytes if lm.device.type != "cpu" else 0,
                                       host_bytes=host_bytes, path=folder / f"{HIDDEN}-{name}.bin",
                                       pool=pool)
    plan = Plan()
    wanted: dict[str, _Wanted] = {}
    steps: list[tuple[Any, list[tuple[int, SuperWeight]]]] = []  # per lifeline searched: the weights its search found
    pruning: list[tuple[list[list[int]], Lane]] = []
    keys: dict[str, int] = {}

    def want(target: str, context: Callable[[], AbstractContextManager], start: int, reads, scored: bool) -> None:
        entry = wanted.setdefault(target, _Wanted(context=context, start=start))
        entry.reads.update(reads)
        entry.scored = entry.scored or scored

    def plan_block(layer: int, block_input: Callable[[int], Any]) -> list[Carried]:
        """The lanes that start at ``layer``, planned from its weights (loaded now) and its events, explained now."""
        before = set(wanted)
        mechanism = events.mechanism(whole=False)
        here = plan_verification(lm, findings, mechanism, {layer})
        plan.effects += here.effects
        plan.births += here.births
        for key in ("zero", "mean"):
            plan.replaced[key].update(here.replaced[key])
        for lane in here.lanes():
            want(lane.target, lane.context, lane.start, lane.reads, lane.scored)
        for edit in here.effects:
            want(edit.target, edit.context, edit.start, (), True)
        for line in mechanism.lifelines:
            if line.born_at != layer or not any((a.dim, a.role, a.text, a.position) == (line.dim, "birth", line.text, line.position)
                                                for a in mechanism.attribution):
                continue
            with run_from(lm, layer, block_input(carrier_batch[line.text])):
                activations = probe_block(lm, inputs[line.text], layer, [line.position])["mlp_act"][0].double()
            found = list(search(lm, line, activations, settings.super_weight_steps))
            steps.append((line, found))
            read = Read(text=line.text, layers=tuple(sorted({layer, line.peak_layer})), position=line.position, dim=line.dim,
                        stream=line.stream)
            for count in range(1, len(found) + 1):
                zeroed = [weight for _, weight in found[:count]]
                want(step_target(zeroed), lambda zeroed=zeroed: _zeroed(lm, zeroed), layer, (read,), True)
        for pairs, lane in pruning_lanes(lm, findings, mechanism, scored=True):
            if lane.start == layer:
                pruning.append((pairs, lane))
                want(lane.target, lane.context, lane.start, lane.reads, lane.scored)
        lanes = []
        for target in [t for t in wanted if t not in before and t != "baseline"]:
            entry = wanted[target]
            keys[target] = len(keys)
            carried = sorted({carrier_batch[read.text] for read in entry.reads}) + (windows if entry.scored else [])
            last = n_layers - 1 if entry.scored else max(block for read in entry.reads for block in read.layers)
            lanes.append(Carried(key=target, context=entry.context, start=entry.start, batches=carried, last=last,
                              states=states(str(keys[target]))))
        return lanes

    values: dict[tuple[str, Read], dict[int, float]] = {}
    # The unmodified lane's detection stream at the massive dims, every block, on each carrier's text: its reads at a
    # block are planned only once it has gone through that block.
    columns = {d.dim: column for column, d in enumerate(findings.dims)}
    dims = torch.tensor(list(columns), device=lm.device)
    unmodified: dict[tuple[int, int], torch.Tensor] = {}
    read_texts: list[dict[int, tuple[float, list[int]]]] = [{} for _ in ids]
    running = [-1]

    dependence_hidden: dict[int, dict[int, torch.Tensor]] = {}  # a dependence batch's stream at the births so far

    def at_block(layer: int, lane: Carried) -> AbstractContextManager:
        """The lane's reads at this block, and the unmodified lane's input-dependence batches at a birth block."""
        entry = wanted.get(lane.key)
        reads = [read for read in (entry.reads if entry is not None else ()) if layer in read.layers]
        dependence = lane.key == "baseline" and layer in births

        def keep(_, __, hidden: torch.Tensor) -> None:
            index = running[0]
            if lane.key == "baseline" and index in text_of:
                unmodified[text_of[index], layer] = hidden[:1].index_select(-1, dims).detach().cpu()
            for read in reads:
                if carrier_batch[read.text] == index:
                    values.setdefault((lane.key, read), {})[layer] = coordinate(hidden, read.position, read.dim, read.stream)
            if dependence and index in grouped:
                dependence_hidden.setdefault(index, {})[layer] = hidden.detach().float()
                if layer == births[-1]:
                    read_group(dependence_hidden.pop(index), grouped[index], ids, findings.dims, findings.criterion, read_texts)

        stack = ExitStack()
        if lane.key == "baseline":
            stack.enter_context(events.at_block(layer))
        if reads or dependence or lane.key == "baseline":
            stack.enter_context(tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], keep))
        return stack

    def on_batch(lane: Carried, index: int) -> None:
        running[0] = index
        events.running = text_of.get(index, -1)

    lanes = carry_lanes(streamed, batches, until, plan_block, at_block, states("baseline"), on_batch, events.finished, on_block)
    mechanism = events.mechanism()
    by_key = {lane.key: lane for lane in lanes}
    for key, lane in by_key.items():
        evaluation.finals[key] = lane.states.get
    try:
        read_unmodified = lambda read: {layer: coordinate(unmodified[read.text, layer], read.position, columns[read.dim], read.stream)
                                        for layer in read.layers}
        results = _Results(evaluation=evaluation, values=values, dependence_rows=dependence_from(lm, ids, read_texts, findings.dims),
                           unmodified=read_unmodified)
        causal = Causal(verification=verification_from(lm, plan, results, findings, evaluation))
        for line, found in steps:
            medians = findings.stream_medians(line.stream)
            read = Read(text=line.text, layers=tuple(sorted({line.born_at, line.peak_layer})), position=line.position, dim=line.dim,
                        stream=line.stream)
            for count, (neuron, weight) in enumerate(found, start=1):
                target = step_target([w for _, w in found[:count]])
                with evaluation.lane(target):
                    ppl = evaluation.score(n_layers, key=target)
                step = step_from(line, count, neuron, weight, values[target, read], medians, findings.criterion, ppl, evaluation.baseline)
                causal.super_weights.append(step)
                if not step.still_massive:
                    break
        causal.expert_pruning = [pruning_from(lane, pairs, results.measure(lane), evaluation.baseline, findings, None, None)
                                 for pairs, lane in pruning]
    finally:
        for lane in lanes:
            lane.states.remove()
    return mechanism, causal


@contextmanager
def _zeroed(lm: LoadedModel, weights: list[SuperWeight]) -> Iterator[None]:
    """The super weights found so far zeroed together."""
    with ExitStack() as stack:
        for weight in weights:
            stack.enter_context(set_weight(lm, weight.matrix, (weight.row, weight.col)))
        yield

