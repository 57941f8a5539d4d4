"""All of a dim's super weights, Yu et al.'s iterative way: zero the super weight, measure the dim again, name the
weight of the top contributor of what is left, zero it too, until the dim is no longer massive."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from functools import partial

import torch

from ...capture.edits import read_coordinate, set_weight
from ...capture.probe import probe_block
from ...models.loading import LoadedModel
from ...settings import Criterion, ScanSettings
from ..detect.results import Findings
from ..evaluation.windows import Evaluation
from ..mechanism.attribution import down_row, super_weight
from ..mechanism.results import Lifeline, Mechanism, SuperWeight
from .results import SuperWeightStep

MAX_STEPS = 5  # super weights zeroed per dim at most (an option of scan)


@torch.no_grad()
def iterate(lm: LoadedModel, line: Lifeline, input_ids: torch.Tensor, medians: list[float], criterion: Criterion,
            score: Callable[[str], float], baseline: float, steps: int = MAX_STEPS) -> Iterator[SuperWeightStep]:
    """The dim's super weights in the order the search finds them (each yielded as it is found), at its birth block
    and main carrier (in its stream, with hyper-connections); ``score`` is the verification's perplexity (exp of the
    masked-LM loss for an encoder), given the target the weights zeroed so far spell (the first alone is the
    verification's super-weight row: measured once).
    Every weight is written back, bit for bit, when the search ends (the iterator is exhausted or closed)."""
    layer, position, dim = line.born_at, line.position, line.dim
    activations = probe_block(lm, input_ids, layer, [position])["mlp_act"][0].double()
    found: list[SuperWeight] = []
    with closing(search(lm, line, activations, steps)) as weights:  # closed: the weights are written back at once
        for neuron, weight in weights:  # the weights found so far stay zeroed meanwhile
            found.append(weight)
            values = read_coordinate(lm, input_ids, sorted({layer, line.peak_layer}), position, dim, line.stream)
            step = step_from(line, len(found), neuron, weight, values, medians, criterion, score(step_target(found)), baseline)
            yield step
            if not step.still_massive:
                break


def search(lm: LoadedModel, line: Lifeline, activations: torch.Tensor, steps: int) -> Iterator[tuple[int, SuperWeight]]:
    """Each next super weight of the lifeline's dim at its birth block, with the neuron it reads, from that block's MLP
    activations at the main carrier (``activations``, float64; zeroing entries of the down projection leaves them as
    they are): the top contributor toward the value of what the down projection's row still holds. Every weight
    yielded stays zeroed until the search goes on or ends, when all are written back; it stops after ``steps``, or
    where nothing left writes toward the value."""
    layer, dim = line.born_at, line.dim
    zeroed: list[float] = []  # |w| of the weights zeroed so far, to rank the next one in the unmodified matrix
    with ExitStack() as stack:
        for _ in range(steps):
            row, _ = down_row(lm.at(layer), lm.model, layer, dim)  # the birth block's own MLP (blocks may differ)
            toward = activations * row * line.sign
            if float(toward.max()) <= 0:  # nothing left writes toward the value
                return
            neuron = int(toward.argmax())
            weight = super_weight(lm.at(layer), lm.model, layer, dim, neuron)
            weight.rank += sum(earlier > abs(weight.value) for earlier in zeroed)
            zeroed.append(abs(weight.value))
            stack.enter_context(set_weight(lm, weight.matrix, (weight.row, weight.col)))
            yield neuron, weight


def step_target(weights: list[SuperWeight]) -> str:
    """The target the weights zeroed together spell (the first alone is the verification's super-weight row)."""
    return " + ".join(f"weight {w.matrix}{[w.row, w.col]}" for w in weights)


def step_from(line: Lifeline, step: int, neuron: int, weight: SuperWeight, values: dict[int, float], medians: list[float],
              criterion: Criterion, ppl: float, baseline: float) -> SuperWeightStep:
    """One step of the search measured: the value at the birth and peak blocks with the weights so far zeroed
    (``values``), still massive at either, and the score."""
    layer = line.born_at
    still = any(criterion.is_massive(values[block], medians[block]) for block in (layer, line.peak_layer))
    return SuperWeightStep(dim=line.dim, layer=layer, step=step, neuron=neuron, weight=weight, value_birth=values[layer],
                           value_peak=values[line.peak_layer], still_massive=still, perplexity=ppl, perplexity_ratio=ppl / baseline)


def all_super_weights(lm: LoadedModel, inputs: dict[int, torch.Tensor], evaluation: Evaluation, findings: Findings,
                      mechanism: Mechanism, settings: ScanSettings) -> Iterator[SuperWeightStep]:
    """The iterative search, at most ``settings.super_weight_steps`` weights per dim, for every dim whose birth a dense
    MLP writes at its main carrier (a birth attribution of the ``mechanism`` there: attention and experts have no
    single down projection to search), scored as the verification is (``evaluation``: the verification's, to reuse
    its passes), against the unmodified model's score, each step yielded as it is found. Every weight zeroed is in the
    birth block, so each score runs from there on. With hyper-connections the value is read in the lifeline's stream,
    against that stream's median |a|."""
    attribution, criterion, baseline = mechanism.attribution, findings.criterion, evaluation.baseline
    steps = settings.super_weight_steps
    for line in mechanism.lifelines:
        medians = findings.stream_medians(line.stream)
        if any((a.dim, a.role, a.text, a.position) == (line.dim, "birth", line.text, line.position) for a in attribution):
            yield from iterate(lm, line, inputs[line.text], medians, criterion, partial(evaluation.score, line.born_at),
                               baseline, steps)
