"""The quantization sweep of a streamed model (``models.checkpoint``), each block's weights read once for every
setting: the settings and the engines' ways are lanes of one pass (``capture.streaming.carry_lanes``).

First a pass over the blocks the protected dims are massive in, and those before, marks each evaluation window's
massive tokens (the activation settings keep them in float from the first block on, so they must be known before).
Then every lane starts at block 0:

- a weight setting quantizes the block's projections as it goes through it (its super weights held out, the rest
  clipped, as in memory) and restores them after;
- an activation setting fake-quantizes every projection's input in the block, one window at a time;
- an engine's way swaps in the library's quantized modules of the block (each quantized once, for all its ways) and,
  for the sparse way, adds back the super weights' errors.

Every lane carries the probe to the target dim's peak block, where its value is read, and the evaluation windows
through the final norm and head. The rows are built by the functions that build them in memory
(``quant.quant_row``, ``engines.EngineWays.row``, ``quant.quantization_from``), so each number is the in-memory one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ...capture.edits import coordinate
from ...capture.hooks import tap
from ...capture.streaming import Batch, Carried, HiddenStates, carry, carry_lanes, run_head
from ...models.checkpoint import StreamedModel
from ..detect.stream import StreamPlace
from ..evaluation.mlm import next_token_windows
from ..evaluation.perplexity import EvalText, perplexity_of
from ..evaluation.windows import LaneEvaluation
from .engines import Engine, EngineWays, engine_modules, engine_ways, no_module_taken, quantize_modules, sparse_corrections, swapped
from .protect import Protect
from .quant import (
    ActivationQuant,
    Setting,
    SweepOptions,
    SweepPlan,
    finished,
    massive_at,
    massive_blocks,
    quant_row,
    quantization_from,
    quantized_weights,
    siblings,
    skipped_note,
    sweep_inputs,
    sweep_plan,
    weight_quantizer,
    windowed,
)
from .results import EngineRow, Quantization, QuantRow

HIDDEN = "quant-hidden"  # the lanes' memory-mapped files in the output folder, one per lane: NAME-<lane>.bin


@torch.no_grad()
def streamed_quantization(streamed: StreamedModel, protect: Protect, options: SweepOptions, place: StreamPlace,
                          on_block: Callable[[str, int], None] | None = None, earlier: Quantization | None = None) -> Quantization:
    """``quant.measure_quantization`` of a streamed model: the same grid, engines and evaluation text (``options``,
    from ``quant.sweep_options``), in two passes (``on_block(pass, layer)`` as each block is done): the massive
    tokens' pass over the blocks to the last protected one, then every setting and engine way as a lane of one pass
    over all blocks. ``place``: where the lanes' hidden states go, all together, beyond its device and host
    allowances. ``earlier`` (a saved sweep) is returned as it is, with no pass, where it was measured on the same
    inputs (``quant.sweep_inputs``)."""
    lm = streamed.lm
    inputs = sweep_inputs(lm, protect, options)
    if earlier is not None and earlier.inputs_sha256 == inputs:
        return earlier
    started = time.perf_counter()
    plan = sweep_plan(lm, protect, options.text, options.source, options.grid, options.clip_z, options.block)
    masks, probe_mask = _massive_tokens(streamed, plan, protect, place,
                                        lambda layer: on_block("massive tokens", layer) if on_block else None)
    lanes = _SweepPass(streamed, plan, protect, options.engines, masks, probe_mask, place)
    result = lanes.run(lambda layer: on_block("settings", layer) if on_block else None, started)
    return finished(lm, protect, result, inputs)


def _massive_tokens(streamed: StreamedModel, plan: SweepPlan, protect: Protect, place: StreamPlace,
                    on_block: Callable[[int], None]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each evaluation window's massive tokens and the probe's (``quant.massive_positions`` of each), in one pass of
    them, each a batch of its own, to the last block a protected dim is massive in."""
    lm = streamed.lm
    texts = [*plan.windows, plan.probe]
    batches = [Batch(ids=ids, mask=torch.ones_like(ids), texts=torch.tensor([index])) for index, ids in enumerate(texts)]
    found = [torch.zeros(ids.shape[1], dtype=torch.bool) for ids in texts]
    wanted = set(massive_blocks(protect))
    running = [-1]

    def mark(_, __, hidden: torch.Tensor) -> None:
        found[running[0]] |= massive_at(hidden, protect)

    def at_block(layer: int) -> AbstractContextManager:
        return tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], mark) if layer in wanted else nullcontext()

    def on_batch(layer: int, batch: Batch) -> None:
        running[0] = int(batch.texts[0])

    states = HiddenStates(device=lm.device, device_bytes=place.device_bytes if lm.device.type != "cpu" else 0,
                          host_bytes=place.host_bytes, path=place.folder / f"{HIDDEN}-tokens.bin")
    try:
        carry(streamed, batches, at_block, states, on_batch=on_batch, finished=on_block, last=max(wanted))
    finally:
        states.remove()
    return found[:-1], found[-1]


@dataclass(kw_only=True)
class _EngineState:
    """One engine in the pass: its ways, the float projections by name, and what its quantized modules stored; the
    quantized modules of the block the pass is at (made once, for all its ways) and the seconds that took."""

    engine: Engine
    ways: EngineWays
    originals: dict[str, nn.Linear]
    nbytes: dict[str, int] = field(default_factory=dict)
    layer: int = -1
    modules: dict[str, nn.Module] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(kw_only=True)
class _Lane:
    """What one lane measures: a weight ``setting`` (with its "held out" variants), an activation one (``quant``), or
    an engine's way (``engine``, ``kind``, the modules kept in float); the probe's values, the sparse way's corrections
    and the seconds the lane ran."""

    key: str
    setting: Setting | None = None
    quant: ActivationQuant | None = None
    engine: str | None = None
    kind: str = ""
    in_float: list[str] = field(default_factory=list)
    values: dict[int, float] = field(default_factory=dict)
    corrected: int = 0
    largest: float = 0.0
    skipped: set[str] = field(default_factory=set)
    seconds: float = 0.0


class _SweepPass:
    """``streamed_quantization``'s lane pass: its batches (the evaluation windows batched for scoring, each window
    alone for the activation settings, the probe), one lane per setting and engine way, and the sweep from them."""

    def __init__(self, streamed: StreamedModel, plan: SweepPlan, protect: Protect, engines: tuple[str, ...],
                 masks: list[torch.Tensor], probe_mask: torch.Tensor, place: StreamPlace):
        lm = self.lm = streamed.lm
        self.streamed, self.plan, self.protect, self.engine_names = streamed, plan, protect, engines
        self.masks, self.probe_mask, self.place = masks, probe_mask, place
        self.n_layers = len(lm.adapter.blocks(lm.model))
        self.evaluation = LaneEvaluation(lm, next_token_windows(plan.windows), EvalText(text="", source=plan.eval_source))
        self.batches = [Batch(ids=b.ids, mask=b.mask, texts=torch.tensor([-1])) for b in self.evaluation.batches]
        self.scored = list(range(len(self.batches)))
        self.alone = list(range(len(self.batches), len(self.batches) + len(plan.windows)))
        self.batches += [Batch(ids=ids, mask=torch.ones_like(ids), texts=torch.tensor([-1])) for ids in plan.windows]
        self.probe = len(self.batches)
        self.batches.append(Batch(ids=plan.probe, mask=torch.ones_like(plan.probe), texts=torch.tensor([-1])))
        self.until = [self.n_layers - 1] * self.probe + [plan.layers[-1]]
        self.engines = {name: self._engine(name) for name in engines}
        self.lanes: dict[str, _Lane] = {"baseline": _Lane(key="baseline")}
        for number, group in enumerate(siblings(plan.settings)):
            for variant, setting in enumerate(group):
                key = f"setting {number}.{variant}"
                quant = None
                if setting.method == "activation":
                    quant = ActivationQuant(lm, setting.granularity == "token", setting.variant == "massive in float")
                self.lanes[key] = _Lane(key=key, setting=setting, quant=quant)
        for name, state in self.engines.items():
            for kind, in_float in state.ways.ways() + ([("sparse", [])] if state.ways.protected else []):
                self.lanes[f"engine {name} {kind}"] = _Lane(key=f"engine {name} {kind}", engine=name, kind=kind, in_float=in_float)
        self.pool = {"device": 0, "host": 0, "file": 0}
        self.running = -1

    def _engine(self, name: str) -> _EngineState:
        """Engine ``name``'s ways, from the modules its rules take (its blocks' shapes: no weight is read for them)."""
        the_engine, originals, refused = engine_modules(self.lm, name)
        taken = [module for module in originals if module not in refused]
        if not taken:
            raise no_module_taken(name, originals, refused)
        return _EngineState(engine=the_engine, ways=engine_ways(self.lm, self.protect, name, the_engine, originals, taken, refused),
                            originals=originals)

    def states(self, name: str) -> HiddenStates:
        place = self.place
        return HiddenStates(device=self.lm.device, device_bytes=place.device_bytes if self.lm.device.type != "cpu" else 0,
                            host_bytes=place.host_bytes, path=place.folder / f"{HIDDEN}-{name}.bin", pool=self.pool)

    def plan_block(self, layer: int, block_input) -> list[Carried]:
        """Every lane starts at block 0, from the embeddings."""
        if layer > 0:
            return []
        lanes = []
        for count, lane in enumerate(list(self.lanes.values())[1:], start=1):
            carried = (self.alone if lane.quant is not None else self.scored) + [self.probe]
            lanes.append(Carried(key=lane.key, context=lambda batch: nullcontext(), start=0, batches=carried, last=self.n_layers - 1,
                                 states=self.states(str(count))))
        return lanes

    def at_block(self, layer: int, carried: Carried) -> AbstractContextManager:
        """The lane's quantization of this block while its batches go through, and the probe's read."""
        lm, lane = self.lm, self.lanes[carried.key]
        stack = ExitStack()
        stack.enter_context(self._timed(lane))
        if layer in self.plan.layers:
            def read(_, __, hidden: torch.Tensor) -> None:
                if self.running == self.probe:
                    lane.values[layer] = coordinate(hidden, self.plan.target.probe_position, self.plan.target.dim)

            stack.enter_context(tap(lm.model, lm.adapter, [(layer, lm.adapter.stream)], read))
        if lane.quant is not None:
            stack.enter_context(lane.quant.active())
        elif lane.setting is not None:
            setting = lane.setting
            quantize, skip = weight_quantizer(setting)
            done = stack.enter_context(quantized_weights(lm, quantize, self.plan.held if setting.variant != "plain" else [],
                                                         self.plan.clip_z if setting.variant == "held out + clip" else None, skip,
                                                         layers={layer}))
            lane.skipped.update(done.skipped)
        elif lane.engine is not None:
            state = self._quantized(lane.engine, layer)
            stack.enter_context(swapped(lm, {m: q for m, q in state.modules.items() if m not in lane.in_float}))
            if lane.kind == "sparse":
                here = [c for c in state.ways.coordinates if c[0] in state.modules]
                corrected, largest = stack.enter_context(sparse_corrections(state.modules, state.engine, state.originals, here))
                lane.corrected, lane.largest = lane.corrected + corrected, max(lane.largest, largest)
        return stack

    def _quantized(self, name: str, layer: int) -> _EngineState:
        """Engine ``name`` with block ``layer``'s projections quantized (once per block, for all its ways)."""
        state = self.engines[name]
        if state.layer != layer:
            prefix = f"{self.lm.adapter.layers_path(self.lm.model)}.{layer}."
            here = {m: linear for m, linear in state.originals.items() if m.startswith(prefix)}
            began = time.perf_counter()
            state.modules = quantize_modules(state.engine, name, here, state.ways.refused)
            state.seconds += time.perf_counter() - began
            state.nbytes.update({m: state.engine.nbytes(q) for m, q in state.modules.items()})
            state.layer = layer
        return state

    @contextmanager
    def _timed(self, lane: _Lane) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            lane.seconds += time.perf_counter() - began

    def on_batch(self, carried: Carried, index: int) -> None:
        self.running = index
        quant = self.lanes[carried.key].quant
        if quant is not None:  # the window's own massive tokens; the probe's, which no error share counts
            quant.keep = self.probe_mask if index == self.probe else self.masks[index - self.alone[0]]
            quant.counting = index != self.probe

    def finished(self, layer: int) -> None:
        for state in self.engines.values():
            state.modules = {}

    def run(self, on_block: Callable[[int], None], started: float) -> Quantization:
        lanes = carry_lanes(self.streamed, self.batches, self.until, self.plan_block, self.at_block, self.states("baseline"),
                            self.on_batch, None, lambda layer: (self.finished(layer), on_block(layer)))
        try:
            for carried in lanes:
                self.evaluation.finals[carried.key] = carried.states.get
            return self._sweep(lanes, started)
        finally:
            for carried in lanes:
                carried.states.remove()

    def _score(self, lane: _Lane, carried: Carried) -> float:
        """The lane's perplexity: its scored windows through the head, or (activations) each window alone."""
        if lane.quant is None:
            with self.evaluation.lane(lane.key):
                began = time.perf_counter()
                score = self.evaluation.score(self.n_layers, key=lane.key)
                lane.seconds += time.perf_counter() - began
                return score
        began = time.perf_counter()
        scores = [perplexity_of([(run_head(self.lm, self.batches[index], carried.states.get(index)).logits, ids)])
                  for index, ids in zip(self.alone, self.plan.windows)]  # each window's, as ``perplexity`` scores it alone
        lane.seconds += time.perf_counter() - began
        return windowed(self.plan.windows, scores)

    def _sweep(self, lanes: list[Carried], started: float) -> Quantization:
        plan, base = self.plan, self.lanes["baseline"]
        carried = {lane.key: lane for lane in lanes}
        with self.evaluation.lane("baseline"):
            baseline = self.evaluation.baseline
        rows: list[QuantRow] = []
        notes: list[str] = []
        for lane in list(self.lanes.values())[1:]:
            if lane.setting is None:
                continue
            ppl = self._score(lane, carried[lane.key])
            share = lane.quant.share if lane.quant is not None else None
            rows.append(quant_row(plan, lane.setting, ppl, baseline, lane.values, base.values, share, lane.seconds))
            if lane.skipped and not any(lane.setting.fmt in n for n in notes):
                notes.append(skipped_note(lane.setting.fmt, len(lane.skipped)))
        found: list[EngineRow] = []
        float_value = base.values[plan.target.born_at]
        for name, state in self.engines.items():
            if not state.nbytes:
                raise no_module_taken(name, state.originals, state.ways.refused)
            for lane in (lane for lane in self.lanes.values() if lane.engine == name):
                ppl = self._score(lane, carried[lane.key])
                found.append(state.ways.row(lane.kind, lane.in_float, ppl, lane.values[plan.target.born_at], baseline, float_value,
                                            state.nbytes, lane.seconds + state.seconds / 4, lane.corrected, lane.largest))
        return quantization_from(self.lm, plan, self.protect, baseline, base.values, self.masks, rows, notes, self.engine_names,
                                 found, time.perf_counter() - started)
