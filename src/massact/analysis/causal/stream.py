"""The causal stage of a streamed model (``models.checkpoint``), in the pass that explains the mechanism's events, each
block's weights read once: the interventions are lanes of that pass (``capture.streaming.carry_lanes``). The
unmodified lane carries the evaluation windows, the carriers' texts and the input dependence's texts, and explains each
block's events as it goes through the block; then the interventions that start there are planned from the block's
weights and events (the same ``plan_verification``, super-weight ``search`` and ``pruning_lanes`` as in memory), and
each becomes a lane that carries, from that block on, the windows it is scored on and the texts it reads. The Q/K
disruption test (planned before the pass, from the concentration the lifeline pass read) adds its windows and passkey
prompts to the unmodified lane, and two lanes that carry them from the first block whose queries or keys they zero:
the massive dims zeroed, and the control's. After the last block every scored lane goes through the final norm and
head.

The rows, claims, steps and the disruption test are then built from the lanes' results by the functions that build
them in memory, so each number is the one the in-memory stage computes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ...capture.attention import block_attention, softmax_layers
from ...capture.batches import pad_batch
from ...capture.edits import coordinate, set_weight
from ...capture.hooks import tap
from ...capture.prefix import run_from
from ...capture.probe import probe_block
from ...capture.streaming import Batch, Carried, HiddenStates, carry_lanes, run_head
from ...models.checkpoint import StreamedModel
from ...models.loading import LoadedModel
from ...settings import ScanSettings
from ..detect.stream import StreamPlace
from ..evaluation.mlm import masked_windows, next_token_windows
from ..evaluation.perplexity import EvalText, eval_windows, perplexity_of
from ..evaluation.windows import LaneEvaluation
from ..function.qk import Scored, disruption_from, disruption_test, passkey_batch, passkey_of, qk_layouts, zeroed_dims
from ..function.results import QkDisruption
from ..function.sinks import SinkPass, SinkSums, replaced_massive, sink_groups, sink_texts, sinks_from, text_metrics
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
    replacement_values,
    verification_from,
)

HIDDEN = "causal-hidden"  # the lanes' memory-mapped files in the output folder, one per lane: NAME-<lane>.bin
QK_LANES = ("qk: massive", "qk: control")  # the Q/K disruption test's zeroed settings, after the unmodified one


@dataclass(kw_only=True)
class _Wanted:
    """What one lane measures, merged over every planned lane with its target: the context (given the batch going
    through), start block, reads, whether it is scored, whether it carries the sink texts and whether the Q/K
    disruption test's batches."""

    context: Callable[[Batch], AbstractContextManager]
    start: int
    reads: set[Read] = field(default_factory=set)
    scored: bool = False
    sinks: bool = False
    qk: bool = False


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
        values = {read: self.unmodified(read) if lane.target == "baseline" else self._lane(lane, read) for read in lane.reads}
        ppl = None
        if lane.scored:
            with self.evaluation.lane(lane.target):
                ppl = self.evaluation.score(self.evaluation.layers, key=lane.target)
        return Measured(values=values, perplexity=ppl)

    def _lane(self, lane: Lane, read: Read) -> dict[int, float]:
        """What ``lane`` reads of ``read``: before its first block the model is unmodified, so there the unmodified
        lane's values (a super expert pruned after a dense block where the dim is already massive)."""
        before = {layer: value for layer, value in self.unmodified(read).items() if layer < lane.start}
        return {**before, **self.values.get((lane.target, read), {})}

    def effects(self, edits: list[Edit]) -> tuple[list[OutputEffect], list[EmbeddingChange]]:
        evaluation = self.evaluation
        picked = [Edit(e.name, e.target, lambda target=e.target: evaluation.lane(target), evaluation.layers) for e in edits]
        return output_effects(evaluation.lm, evaluation, picked), []

    def dependence(self) -> list[InputDependence]:
        return self.dependence_rows


def _each_batch(context: Callable[[], AbstractContextManager]) -> Callable[[Batch], AbstractContextManager]:
    """A lane's context for every batch alike."""
    return lambda batch: context()


def _valid(batch: Batch) -> torch.Tensor | None:
    """A padded batch's attention mask, each text judged on its own positions (None for one text, as in memory)."""
    return batch.mask if batch.ids.shape[0] > 1 else None


@torch.no_grad()
def streamed_causal(streamed: StreamedModel, events: EventPass, settings: ScanSettings, text: EvalText, place: StreamPlace,
                    on_block: Callable[[int], None] | None = None) -> tuple[Mechanism, Causal, QkDisruption | None]:
    """The mechanism's second pass (``events``: the events the lifelines name, explained as the pass reaches them, with
    the findings and kept texts they come from; none where nothing is massive) and ``pipeline.causal_stage`` of a
    streamed model, in one pass (``on_block(layer)`` as each block is done): the interventions with their output
    effects and the input dependence, the attention sinks with the massive values replaced, the super weights zeroed
    one by one, a mixture's super experts (``events.super_experts``, the corpus pass's) pruned against a random
    control, and the Q/K disruption test of the dims ``events.qk`` finds massive (None where none is). A block's
    interventions are planned from its events, explained as the unmodified lane has gone through it. ``place``: where
    the lanes' hidden states go, all together, beyond its device and host allowances (files in its folder).
    ``events.trigger``: run on the unmodified model once its last block's events are explained, the blocks up to it
    kept loaded (``analysis.trigger.stream``)."""
    return _LanePass(streamed, events, settings, text, place).run(on_block)


class _LanePass:
    """``streamed_causal``'s pass: its batches (the evaluation windows, the carriers' texts, the input dependence's and
    the sinks' texts, the Q/K disruption test's windows and passkey prompts), the lanes planned as the blocks load,
    what they read, and the report's sections from them."""

    def __init__(self, streamed: StreamedModel, events: EventPass, settings: ScanSettings, text: EvalText, place: StreamPlace):
        lm = self.lm = streamed.lm
        findings, inputs = events.findings, events.inputs
        self.streamed, self.findings, self.inputs, self.events, self.settings = streamed, findings, inputs, events, settings
        self.n_layers = len(lm.adapter.blocks(lm.model))
        scored = masked_windows(lm, text.text) if lm.adapter.encoder else next_token_windows(eval_windows(lm, text.text))
        self.evaluation = LaneEvaluation(lm, scored, text)
        self.batches = [Batch(ids=b.ids, mask=b.mask, texts=torch.tensor([-1])) for b in self.evaluation.batches]
        self.windows = list(range(len(self.batches)))
        until = [self.n_layers - 1] * len(self.batches)
        self.carrier_batch, self.text_of = {}, {}
        for number in sorted({line.text for line in events.lines} | set(events.texts)):
            self.carrier_batch[number], self.text_of[len(self.batches)] = len(self.batches), number
            self.batches.append(Batch(ids=inputs[number], mask=torch.ones_like(inputs[number]), texts=torch.tensor([number])))
            until.append(self.n_layers - 1)
        self.births = sorted({d.born_at for d in findings.dims})
        self.ids = dependence_inputs(lm, text.text, findings.texts) if findings.dims else []
        self.grouped: dict[int, list[int]] = {}
        for group in dependence_groups(self.ids):
            self.grouped[len(self.batches)] = group
            padded, mask = pad_batch([self.ids[i] for i in group])  # right padding: every real token is computed as alone
            self.batches.append(Batch(ids=padded, mask=mask, texts=torch.tensor(group)))
            until.append(self.births[-1])
        self.softmax = softmax_layers(lm)
        self.learned = any(lm.at(layer).sinks for layer in self.softmax)  # learned sink logits (gpt-oss)
        self.sinks = sink_texts(findings)[0] if self.softmax else {}
        self.sink_batch: dict[int, list[int]] = {}
        for group in sink_groups(self.sinks):
            self.sink_batch[len(self.batches)] = group
            padded, mask = pad_batch([inputs[number] for number in group])
            self.batches.append(Batch(ids=padded, mask=mask, texts=torch.tensor(group)))
            until.append(self.softmax[-1])
        # The Q/K disruption test, planned from pass 2's concentration: its windows one a batch, as perplexity() runs
        # them, and its passkey prompts as one padded batch, scored after the last block in each of its settings.
        self.qk = disruption_test(lm, events.qk, text) if events.qk is not None and not lm.adapter.encoder else None
        self.qk_layouts = qk_layouts(lm) if self.qk is not None else {}
        self.qk_batches: list[int] = []
        if self.qk is not None:
            passkey_ids, passkey_mask = passkey_batch(self.qk.prompts)
            for ids, mask in [(ids, torch.ones_like(ids)) for ids in self.qk.windows] + [(passkey_ids, passkey_mask)]:
                self.qk_batches.append(len(self.batches))
                self.batches.append(Batch(ids=ids, mask=mask, texts=torch.tensor([-1])))
                until.append(self.n_layers - 1)
        self.until = until
        self.pool = {"device": 0, "host": 0, "file": 0}
        self.trigger = trigger = events.trigger
        if trigger is not None:  # the blocks it keeps count in the lanes' memory
            trigger.hold(self.pool)
        self.device_bytes = place.device_bytes if lm.device.type != "cpu" else 0
        self.host_bytes, self.folder = place.host_bytes, place.folder
        self.plan = Plan()
        self.wanted: dict[str, _Wanted] = {"baseline": _Wanted(context=_each_batch(nullcontext), start=0, sinks=True)}
        self.steps: list[tuple[Any, list[tuple[int, SuperWeight]]]] = []  # per lifeline searched: the weights found
        # the super experts and the lifelines are known before the pass: the pruning lanes are planned once
        self.pruning = pruning_lanes(lm, findings, events.mechanism(whole=False), scored=True)
        self.replaced = replacement_values(findings.dims, findings.massive) if self.sinks else {}
        self.values: dict[tuple[str, Read], dict[int, float]] = {}
        # The unmodified lane's detection stream at the massive dims, every block, on each carrier's text: its reads at
        # a block are planned only once it has gone through that block.
        self.columns = {d.dim: column for column, d in enumerate(findings.dims)}
        self.dims = torch.tensor(list(self.columns), device=lm.device, dtype=torch.long)
        self.unmodified: dict[tuple[int, int], torch.Tensor] = {}
        self.read_texts: list[dict[int, tuple[float, list[int]]]] = [{} for _ in self.ids]
        self.dependence_hidden: dict[int, dict[int, torch.Tensor]] = {}  # a dependence batch's stream at the births so far
        self.attention: dict[str, dict[int, dict[int, dict]]] = {}  # lane -> sink text -> block -> its text_metrics
        self.running = -1
        self.count = 0  # lanes started, which names their files

    def states(self, name: str) -> HiddenStates:
        return HiddenStates(device=self.lm.device, device_bytes=self.device_bytes, host_bytes=self.host_bytes,
                            path=self.folder / f"{HIDDEN}-{name}.bin", pool=self.pool)

    def want(self, target: str, context: Callable[[Batch], AbstractContextManager], start: int, reads, scored: bool,
             sinks: bool = False, qk: bool = False) -> None:
        entry = self.wanted.setdefault(target, _Wanted(context=context, start=start))
        entry.reads.update(reads)
        entry.scored = entry.scored or scored
        entry.sinks = entry.sinks or sinks
        entry.qk = entry.qk or qk

    def plan_block(self, layer: int, block_input: Callable[[int], Any]) -> list[Carried]:
        """The lanes that start at ``layer``, planned from its weights (loaded now) and its events, explained now."""
        lm, findings, before = self.lm, self.findings, set(self.wanted)
        mechanism = self.events.mechanism(whole=False)
        here = plan_verification(lm, findings, mechanism, {layer})
        self.plan.effects += here.effects
        self.plan.births += here.births
        for key in ("zero", "mean"):
            self.plan.replaced[key].update(here.replaced[key])
        for lane in here.lanes():
            self.want(lane.target, _each_batch(lane.context), lane.start, lane.reads, lane.scored)
        for edit in here.effects:
            self.want(edit.target, _each_batch(edit.context), edit.start, (), True)
        for line in mechanism.lifelines:
            if line.born_at == layer and any((a.dim, a.role, a.text, a.position) == (line.dim, "birth", line.text, line.position)
                                             for a in mechanism.attribution):
                self._search(layer, line, block_input)
        for label, by_block in self.replaced.items():  # the sinks with the massive values replaced at every birth
            if by_block and min(by_block) == layer:
                self.want(f"sinks: {label}", lambda batch, by_block=by_block: replaced_massive(lm, by_block, findings.criterion,
                                                                                             _valid(batch)),
                          layer, (), False, sinks=True)
        for _, lane in self.pruning:
            if lane.start == layer:
                self.want(lane.target, _each_batch(lane.context), lane.start, lane.reads, lane.scored, sinks=True)
        for key, plan in zip(QK_LANES, (self.qk.massive, self.qk.control) if self.qk is not None else ()):
            if min(plan) == layer:  # from the first block whose queries or keys it zeroes
                self.want(key, lambda batch, plan=plan: zeroed_dims(lm, plan, self.qk_layouts, self.events.qk), layer, (), False,
                          qk=True)
        lanes = []
        for target in [t for t in self.wanted if t not in before]:
            entry = self.wanted[target]
            carried = (sorted({self.carrier_batch[read.text] for read in entry.reads}) + (self.windows if entry.scored else [])
                       + (list(self.sink_batch) if entry.sinks else []) + (self.qk_batches if entry.qk else []))
            last = (self.n_layers - 1 if entry.scored or entry.sinks or entry.qk
                    else max(block for read in entry.reads for block in read.layers))
            self.count += 1
            lanes.append(Carried(key=target, context=entry.context, start=entry.start, batches=carried, last=last,
                                 states=self.states(str(self.count))))
        return lanes

    def _search(self, layer: int, line, block_input: Callable[[int], Any]) -> None:
        """The lifeline's super weights searched at its birth block (its MLP activations probed from the unmodified
        input), a lane for the first k of them zeroed together for each k."""
        lm = self.lm
        with run_from(lm, layer, block_input(self.carrier_batch[line.text])):
            activations = probe_block(lm, self.inputs[line.text], layer, [line.position])["mlp_act"][0].double()
        found = list(search(lm, line, activations, self.settings.super_weight_steps))
        self.steps.append((line, found))
        read = Read(text=line.text, layers=tuple(sorted({layer, line.peak_layer})), position=line.position, dim=line.dim,
                    stream=line.stream)
        for count in range(1, len(found) + 1):
            zeroed = [weight for _, weight in found[:count]]
            self.want(step_target(zeroed), lambda batch, zeroed=zeroed: _zeroed(lm, zeroed), layer, (read,), True)

    def at_block(self, layer: int, lane: Carried) -> AbstractContextManager:
        """The lane's reads at this block; the unmodified lane's carrier stream, its events and its input-dependence
        batches at a birth block; the sink texts' attention at a softmax block."""
        lm, entry = self.lm, self.wanted[lane.key]
        reads = [read for read in entry.reads if layer in read.layers]
        base = lane.key == "baseline"
        dependence = base and layer in self.births

        def keep(_, __, hidden: torch.Tensor) -> None:
            index = self.running
            if base and index in self.text_of and len(self.dims):
                self.unmodified[self.text_of[index], layer] = hidden[:1].index_select(-1, self.dims).detach().cpu()
            for read in reads:
                if self.carrier_batch[read.text] == index:
                    self.values.setdefault((lane.key, read), {})[layer] = coordinate(hidden, read.position, read.dim, read.stream)
            if dependence and index in self.grouped:
                self.dependence_hidden.setdefault(index, {})[layer] = hidden.detach().float()
                if layer == self.births[-1]:
                    read_group(self.dependence_hidden.pop(index), self.grouped[index], self.ids, self.findings.dims,
                               self.findings.criterion, self.read_texts)

        def attention(found) -> None:
            group = self.sink_batch.get(self.running)
            for row, number in enumerate(group or ()):
                n = self.inputs[number].shape[1]
                self.attention.setdefault(lane.key, {}).setdefault(number, {})[layer] = text_metrics(
                    found, layer, row, n, self.sinks[number], not lm.adapter.encoder, self.learned)

        stack = ExitStack()
        if base:
            stack.enter_context(self.events.at_block(layer))
        if reads or dependence or base:
            stack.enter_context(tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], keep))
        if entry.sinks and self.sink_batch and layer in self.softmax:
            stack.enter_context(block_attention(lm, layer, attention))
        return stack

    def explained(self, layer: int) -> None:
        """The block's events explained, then, at its last block, the trigger (the model unmodified: no lane's
        intervention is open)."""
        self.events.finished(layer)
        if self.trigger is not None:
            self.trigger.finished(layer)

    def on_batch(self, lane: Carried, index: int) -> None:
        self.running = index
        self.events.running = self.text_of.get(index, -1)

    def sink_pass(self, key: str, start: int) -> SinkPass | None:
        """The lane's ``SinkPass``: the unmodified lane's metrics at the blocks before ``start``, which it leaves as
        they are."""
        sums = SinkSums(self.lm, self.settings.sink_epsilon)
        base, lane = self.attention.get("baseline", {}), self.attention.get(key, {})
        for number in self.sinks:
            sums.add({**{layer: m for layer, m in base.get(number, {}).items() if layer < start}, **lane.get(number, {})})
        return sums.result()

    def run(self, on_block: Callable[[int], None] | None) -> tuple[Mechanism, Causal, QkDisruption | None]:
        evaluation = self.evaluation
        lanes = carry_lanes(self.streamed, self.batches, self.until, self.plan_block, self.at_block, self.states("baseline"),
                            self.on_batch, self.explained, on_block, -1 if self.trigger is None else self.trigger.keep)
        try:
            for lane in lanes:
                evaluation.finals[lane.key] = lane.states.get
            return self.events.mechanism(), self._causal({lane.key: lane.start for lane in lanes}), self._disruption()
        finally:
            for lane in lanes:
                lane.states.remove()

    def _causal(self, starts: dict[str, int]) -> Causal:
        """The causal sections from the finished lanes (``starts``: each lane's first block)."""
        lm, findings, evaluation, epsilon = self.lm, self.findings, self.evaluation, self.settings.sink_epsilon
        base = self.sink_pass("baseline", 0) if self.sinks else None
        under = {label: self.sink_pass(f"sinks: {label}", starts[f"sinks: {label}"]) for label in self.replaced
                 if base is not None and f"sinks: {label}" in starts}
        causal = Causal(attention=sinks_from(lm, findings, epsilon, base, self.replaced if base is not None else {}, under))
        read_unmodified = lambda read: {layer: coordinate(self.unmodified[read.text, layer], read.position, self.columns[read.dim],
                                                          read.stream) for layer in read.layers}
        results = _Results(evaluation=evaluation, values=self.values, dependence_rows=dependence_from(lm, self.ids, self.read_texts,
                                                                                                      findings.dims),
                           unmodified=read_unmodified)
        if findings.dims:
            causal.verification = verification_from(lm, self.plan, results, findings, evaluation)
        for line, found in self.steps:
            medians = findings.stream_medians(line.stream)
            read = Read(text=line.text, layers=tuple(sorted({line.born_at, line.peak_layer})), position=line.position, dim=line.dim,
                        stream=line.stream)
            for count, (neuron, weight) in enumerate(found, start=1):
                target = step_target([w for _, w in found[:count]])
                with evaluation.lane(target):
                    ppl = evaluation.score(self.n_layers, key=target)
                step = step_from(line, count, neuron, weight, self.values[target, read], medians, findings.criterion, ppl,
                                 evaluation.baseline)
                causal.super_weights.append(step)
                if not step.still_massive:
                    break
        causal.expert_pruning = [pruning_from(lane, pairs, results.measure(lane), evaluation.baseline, findings, base,
                                              self.sink_pass(lane.target, lane.start) if base is not None else None)
                                 for pairs, lane in self.pruning]
        return causal

    def _disruption(self) -> QkDisruption | None:
        """The Q/K disruption test from its settings' lanes (the unmodified one, then ``QK_LANES``): each of their
        batches' last-block states through the final norm and head, scored as in memory."""
        if self.qk is None:
            return None
        *windows, passkey = self.qk_batches

        def scored(key: str) -> Scored:
            logits = lambda index: run_head(self.lm, self.batches[index], self.evaluation.finals[key](index)).logits
            return (perplexity_of((logits(index), self.batches[index].ids) for index in windows),
                    passkey_of(logits(passkey), self.qk.prompts))

        return disruption_from(self.qk, (scored("baseline"), *(scored(key) for key in QK_LANES)))


@contextmanager
def _zeroed(lm: LoadedModel, weights: list[SuperWeight]) -> Iterator[None]:
    """The super weights found so far zeroed together."""
    with ExitStack() as stack:
        for weight in weights:
            stack.enter_context(set_weight(lm, weight.matrix, (weight.row, weight.col)))
        yield

