"""Causal checks of what the scan named: ablate neurons, zero the super weight, replace the massive values,
and measure the massive value and the perplexity each time; plus how much the value depends on the input.

Each check is planned first, as ``Lane``s (what to change, from which block, what to read under it), then measured,
then turned into rows and claims. Planning reads the birth block's weights; measuring runs the model. In memory each
lane is measured when its row is built (``InMemory``); a streamed model measures every lane of a block in the pass
that reads it (``analysis.causal.stream``) and the rows are built from those results, by the same functions."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from ...capture.batches import pad_batch
from ...capture.edits import ablate_neurons, at_dim, massive_mask, read_coordinate, replace_massive, set_weight
from ...capture.hooks import forward_until, tap
from ...capture.routing import expert_matrix, pruned_experts
from ...models.loading import LoadedModel
from ...settings import Criterion
from ..detect.results import DimSummary, Findings, Massive
from ..evaluation.embeddings import EmbeddingEvaluation
from ..evaluation.embeddings import changes as embedding_changes
from ..evaluation.embeddings import claim as embedding_claim
from ..evaluation.windows import Evaluation
from ..mechanism.results import Attribution, ExpertAttribution, Mechanism
from .output_effects import Edit, output_effects
from .results import EmbeddingChange, InputDependence, Intervention, OutputEffect, Verification

ABLATE_ALONE = 3  # top neurons ablated one at a time
MAX_INPUTS = 64  # inputs for the input-dependence pass
DEPENDENCE_BATCH = 16  # of those inputs per forward pass
CONFIRMING = ("top", "super weight", "neuron", "reroute")  # the lanes whose row says whether the value went


@dataclass(frozen=True, kw_only=True)
class Read:
    """The detection stream of text ``text`` (a kept window's index) at [position, dim], at each of ``layers``; with
    hyper-connections in ``stream`` ("s0", ...), else "" (the stream where it is largest, or the one stream)."""

    text: int
    layers: tuple[int, ...]
    position: int
    dim: int
    stream: str = ""


@dataclass(kw_only=True)
class Lane:
    """One intervention to measure: its ``role`` in the rows built from it, its name and target as the report spells
    them, a factory of the context manager that makes it, the first block it changes (``start``), what is read under
    it, and whether the model is scored under it. Lanes with one target are one measurement."""

    role: str
    name: str
    target: str
    context: Callable[[], AbstractContextManager]
    start: int
    reads: tuple[Read, ...]
    scored: bool


@dataclass(kw_only=True)
class Measured:
    """What a lane measured: each read's value by block, and the score (None where not scored)."""

    values: dict[Read, dict[int, float]]
    perplexity: float | None


class Measure(Protocol):
    """Where lanes are measured: the unmodified score, a lane's reads and score, the output effects of the edits
    (their scores are the rows' too), and the input dependence."""

    baseline: float

    def measure(self, lane: Lane) -> Measured: ...

    def effects(self, edits: list[Edit]) -> tuple[list[OutputEffect], list[EmbeddingChange]]: ...

    def dependence(self) -> list[InputDependence]: ...


@dataclass(kw_only=True)
class Plan:
    """The verification's lanes: the output effects' edits (the super weights' zeroing, the zero and mean
    replacements), each birth attribution's lanes in the order its rows go, and the replacements' values (label ->
    birth block -> dim -> value)."""

    effects: list[Edit] = field(default_factory=list)
    births: list[tuple[Attribution | ExpertAttribution, list[Lane]]] = field(default_factory=list)
    replaced: dict[str, dict[int, dict[int, float]]] = field(default_factory=lambda: {"zero": {}, "mean": {}})

    def lanes(self) -> list[Lane]:
        return [lane for _, lanes in self.births for lane in lanes]


class InMemory:
    """Lanes measured on a model in memory as they are asked for: the reads in one pass that stops at their last
    block, the score from the lane's start block on (``Evaluation.score``: once per target)."""

    def __init__(self, lm: LoadedModel, inputs: dict[int, torch.Tensor], evaluation: Evaluation | EmbeddingEvaluation,
                 findings: Findings, eval_text: str):
        self.lm, self.inputs, self.evaluation, self.findings, self.eval_text = lm, inputs, evaluation, findings, eval_text

    @property
    def baseline(self) -> float:
        return self.evaluation.baseline

    def measure(self, lane: Lane) -> Measured:
        with lane.context():
            values = {read: read_coordinate(self.lm, self.inputs[read.text], list(read.layers), read.position, read.dim, read.stream)
                      for read in lane.reads}
            ppl = self.evaluation.score(lane.start, key=lane.target) if lane.scored else None
        return Measured(values=values, perplexity=ppl)

    def effects(self, edits: list[Edit]) -> tuple[list[OutputEffect], list[EmbeddingChange]]:
        if isinstance(self.evaluation, EmbeddingEvaluation):
            changed = embedding_changes(self.lm, self.evaluation.reference, [(e.name, e.target, e.context) for e in edits])
            return [], changed
        return output_effects(self.lm, self.evaluation, edits), []

    def dependence(self) -> list[InputDependence]:
        findings = self.findings
        return input_dependence(self.lm, self.eval_text, texts=findings.texts, dims=findings.dims, criterion=findings.criterion)


@dataclass
class _Run:
    """What building the rows shares: the model (its kind names the metric), the findings tested (the massive dims
    with each block's median |a|, per stream with hyper-connections, and the criterion that calls a value massive),
    where the lanes are measured, whether the score is the embeddings', and the progress callback."""

    lm: LoadedModel
    findings: Findings
    measure: Measure
    headless: bool
    step: Callable[[], None]

    def median(self, layer: int, stream: str) -> float:
        """What a value in ``stream`` of block ``layer`` is judged against: the stream's own median |a| (the scan's
        criterion), or the block's where there is one stream."""
        return self.findings.stream_medians(stream)[layer]

    @property
    def metric(self) -> str:
        if self.headless:
            return "1 + embedding cosine distance"
        return "exp(masked-LM loss)" if self.lm.adapter.encoder else "perplexity"

    def last_block(self, dim: int) -> int:
        return next(d.persists[-1] for d in self.findings.dims if d.dim == dim)


def verify_by_intervention(
    lm: LoadedModel, inputs: dict[int, torch.Tensor], findings: Findings, mechanism: Mechanism,
    evaluation: Evaluation | EmbeddingEvaluation, step: Callable[[], None] = lambda: None,
) -> Verification:
    """Every intervention on every born dim with an MLP attribution; ``step`` is called after each one. The scan's
    ``findings`` it tests: its massive dims and entries (against each block's median |a|, and the criterion that
    calls a value massive), the ``mechanism``'s birth attribution and experts; the findings' kept windows are read
    again for the input dependence.

    A causal LM is scored by its perplexity on the evaluation text; an encoder by exp(masked-LM loss) on a fixed,
    seeded 15% of its tokens, the same masks for every intervention (``evaluation``: that scoring, from
    ``evaluation_for``, whose passes the super-weight search shares). The super-weight zeroing and the zero/mean
    replacements also get their effect on the output distributions (``output_effects``). A headless encoder (no head
    to score) is scored by its embeddings instead (``embeddings.EmbeddingEvaluation``)."""
    if evaluation.text is None:
        raise ValueError("verify_by_intervention needs the scoring evaluation_for makes (it names its evaluation text)")
    plan = plan_verification(lm, findings, mechanism)
    measure = InMemory(lm, inputs, evaluation, findings, evaluation.text.text)
    return verification_from(lm, plan, measure, findings, evaluation, step)


def plan_verification(lm: LoadedModel, findings: Findings, mechanism: Mechanism, layers: set[int] | None = None) -> Plan:
    """The lanes of every birth attribution and expert of the ``mechanism`` and the output effects' edits, or (with
    ``layers``) of those whose birth block is among ``layers`` alone; the weights of those blocks are read."""
    wanted = lambda layer: layers is None or layer in layers
    attribution = [a for a in mechanism.attribution if a.role == "birth" and wanted(a.layer)]
    experts = [e for e in mechanism.experts if e.role == "birth" and wanted(e.layer)]
    replaced = {label: {layer: values for layer, values in by_layer.items() if wanted(layer)}
                for label, by_layer in replacement_values(findings.dims, findings.massive).items()}
    last = {d.dim: d.persists[-1] for d in findings.dims}
    births = [(a, _dense_lanes(lm, a, last[a.dim])) for a in attribution]
    births += [(e, _expert_lanes(lm, e, last[e.dim])) for e in experts]  # mixture of experts: the weight inside the expert
    return Plan(effects=_effect_interventions(lm, attribution, experts, findings.criterion, replaced), births=births,
                replaced=replaced)


def verification_from(lm: LoadedModel, plan: Plan, measure: Measure, findings: Findings,
                      evaluation: Evaluation | EmbeddingEvaluation, step: Callable[[], None] = lambda: None) -> Verification:
    """The rows and claims of the ``plan``'s lanes as ``measure`` measures them (``evaluation``: the scoring, for
    what it counts and where its text came from)."""
    headless = isinstance(evaluation, EmbeddingEvaluation)
    run = _Run(lm=lm, findings=findings, measure=measure, headless=headless, step=step)
    # What the output loses under the super weights' zeroing and the replacements, in one pass over the windows; the
    # scores it measures on the way serve the rows below.
    found, changed = measure.effects(plan.effects)
    evaluation.cache.update({"baseline": measure.baseline, **{e.target: e.perplexity for e in [*found, *changed]}})
    step()
    rows: list[Intervention] = []
    claims: list[str] = []
    for a, lanes in plan.births:
        rows += (_dense_rows if isinstance(a, Attribution) else _expert_rows)(run, a, lanes, claims)
    for layer in sorted(plan.replaced["zero"]):
        rows += _replacement_rows(run, layer, plan.replaced, evaluation.cache, claims)
    dependence = measure.dependence()
    claims += [_dependence_claim(d) for d in dependence] + [_effect_claim(effect) for effect in found]
    eval_source = evaluation.text.source
    if headless:
        claims.append(f"headless encoder (the checkpoint has no masked-LM head to score): verified by its embeddings of "
                      f"{len(evaluation.reference.mean)} evaluation sentences; the perplexity columns hold 1 + (1 - their "
                      "cosine to the unmodified model's)")
        claims += [embedding_claim(c) for c in changed]
        return Verification(baseline_perplexity=measure.baseline, eval_tokens=evaluation.positions, eval_source=eval_source,
                            interventions=rows, input_dependence=dependence, claims=claims, metric="embeddings",
                            embedding_changes=changed)
    masked_loss = evaluation.baseline_nll / evaluation.positions if lm.adapter.encoder else None
    eval_tokens = evaluation.positions if lm.adapter.encoder else int(sum(b.mask.sum() for b in evaluation.batches))
    return Verification(baseline_perplexity=measure.baseline, eval_tokens=eval_tokens, eval_source=eval_source, interventions=rows,
                        input_dependence=dependence, claims=claims, metric="masked-LM" if lm.adapter.encoder else "perplexity",
                        masked_lm_loss=masked_loss, output_effects=found)


def _lane(a: Attribution | ExpertAttribution, last: int, role: str, name: str, target: str,
          context: Callable[[], AbstractContextManager], scored: bool) -> Lane:
    """A lane at the attribution's block that reads the massive value at the birth and last blocks on the carrier's
    text (with hyper-connections, in the attribution's stream)."""
    read = Read(text=a.text, layers=tuple(sorted({a.layer, last})), position=a.position, dim=a.dim, stream=a.stream)
    return Lane(role=role, name=name, target=target, context=context, start=a.layer, reads=(read,), scored=scored)


def _row(run: _Run, a: Attribution | ExpertAttribution, lane: Lane) -> Intervention:
    """The lane measured as a row: the value at the birth and last blocks, whether it is still massive at birth, and
    the score against the unmodified model's."""
    measured = run.measure.measure(lane)
    run.step()
    values = measured.values[lane.reads[0]]
    last, ppl = run.last_block(a.dim), measured.perplexity
    still = run.findings.criterion.is_massive(values[a.layer], run.median(a.layer, a.stream))
    return Intervention(name=lane.name, target=lane.target, dim=a.dim, layer=a.layer, value_birth=values[a.layer],
                        value_last=values[last], still_massive=still, perplexity=ppl,
                        perplexity_ratio=ppl / run.measure.baseline if ppl is not None else None,
                        confirms=not still if lane.role in CONFIRMING else None)


def _super_weight_lanes(lm: LoadedModel, a: Attribution | ExpertAttribution, last: int, label: str, matrix: str,
                        index: tuple[int, ...]) -> list[Lane]:
    """Zero the super weight (index as stored), then, as a control, the entry closest to it in |w| in the same
    matrix (one expert's matrix in fused expert weights), outside its row and column."""
    r, c, value = _similar_weight(lm.model.get_parameter(matrix).detach()[index[:-2]], *index[-2:])
    control = (*index[:-2], r, c)
    return [_lane(a, last, "super weight", f"zero {label} {list(index)}", f"weight {matrix}{list(index)}",
                  partial(set_weight, lm, matrix, index), True),
            _lane(a, last, "control weight", f"control: zero weight {list(control)} ({value:+.3f})", f"weight {matrix}{list(control)}",
                  partial(set_weight, lm, matrix, control), True)]


def _top_set(a: Attribution) -> list[int]:
    """The top neurons toward the value that make up 90% of what the MLP writes (at least one)."""
    toward = [n for n in a.neurons if n.contribution * a.output > 0]
    return [n.neuron for n in toward[: max(a.neurons_for_90pct, 1)]]


def _dense_lanes(lm: LoadedModel, a: Attribution, last: int) -> list[Lane]:
    """A dense MLP's birth: the baseline, its top neurons ablated alone and together, an unrelated neuron, the super
    weight and its control."""
    lanes = [_lane(a, last, "baseline", "none (baseline)", "baseline", nullcontext, True)]
    toward = [n for n in a.neurons if n.contribution * a.output > 0]
    lanes += [_lane(a, last, "alone", f"ablate neuron {n.neuron}", f"neuron {a.layer}:{n.neuron}",
                    partial(ablate_neurons, lm, a.layer, [n.neuron]), False) for n in toward[:ABLATE_ALONE]]
    top_set = _top_set(a)
    lanes.append(_lane(a, last, "top", f"ablate top {len(top_set)} neuron(s) {top_set}", f"neurons {a.layer}:{top_set}",
                       partial(ablate_neurons, lm, a.layer, top_set), True))
    control = _unrelated_neuron(a)
    lanes.append(_lane(a, last, "control neuron", f"control: ablate neuron {control}", f"neuron {a.layer}:{control}",
                       partial(ablate_neurons, lm, a.layer, [control]), False))
    w = a.super_weight
    return lanes + _super_weight_lanes(lm, a, last, "super weight", w.matrix, (w.row, w.col))


def _dense_rows(run: _Run, a: Attribution, lanes: list[Lane], claims: list[str]) -> list[Intervention]:
    """The dense lanes' rows; the claims they support are appended to ``claims``."""
    rows = [_row(run, a, lane) for lane in lanes]
    role = {lane.role: row for lane, row in zip(lanes, rows)}
    metric, last, top_set, row = run.metric, run.last_block(a.dim), _top_set(a), role["top"]
    claims.append(
        f"dim {a.dim}: ablating neuron(s) {top_set} of block {a.layer} {'removes' if row.confirms else 'does not remove'} the massive "
        f"activation ({_values_at(a.layer, row.value_birth, last, row.value_last)}); {metric} x{row.perplexity_ratio:.2f}"
    )
    w, row, control_row = a.super_weight, role["super weight"], role["control weight"]
    claims.append(
        f"dim {a.dim}: zeroing the super weight {w.matrix}[{w.row}, {w.col}] {'removes' if row.confirms else 'does not remove'} it "
        f"(block {a.layer}: {row.value_birth:+.1f}) and multiplies {metric} by {row.perplexity_ratio:.2f}; "
        f"zeroing a weight of the same size elsewhere in the matrix: x{control_row.perplexity_ratio:.2f}"
    )
    return rows


def _expert_lanes(lm: LoadedModel, e: ExpertAttribution, last: int) -> list[Lane]:
    """A birth inside an expert: the baseline, the writing neuron (its down-projection column zeroed: inside fused
    expert weights no hook sees the neuron), the expert super weight and its control, and the token routed past the
    expert."""
    w = e.moe.super_weight
    matrix, index = expert_matrix(w.matrix, e.layer), tuple(w.index)
    column = _neuron_column(index, w.expert is not None and lm.at(e.layer).moe.experts.transposed)
    where = "the shared expert" if w.expert is None else f"expert {w.expert}"
    lanes = [_lane(e, last, "baseline", "none (baseline)", "baseline", nullcontext, True),
             _lane(e, last, "neuron", f"ablate neuron {w.neuron} of {where}", f"neuron {matrix}[{w.expert}]:{w.neuron}",
                   partial(set_weight, lm, matrix, column), True)]
    lanes += _super_weight_lanes(lm, e, last, "expert super weight", matrix, index)
    if w.expert is not None:  # the token goes to the experts the router picks without it (every token of that block)
        lanes.append(_lane(e, last, "reroute", f"re-route: prune expert {w.expert}", f"prune {e.layer}:[{w.expert}]",
                           partial(pruned_experts, lm, {e.layer: [w.expert]}), True))
    return lanes


def _expert_rows(run: _Run, e: ExpertAttribution, lanes: list[Lane], claims: list[str]) -> list[Intervention]:
    """The expert lanes' rows; the claim they support is appended to ``claims``."""
    rows = [_row(run, e, lane) for lane in lanes]
    role = {lane.role: row for lane, row in zip(lanes, rows)}
    w = e.moe.super_weight
    matrix, index = expert_matrix(w.matrix, e.layer), list(w.index)
    row, control_row, rerouted = role["super weight"], role["control weight"], role.get("reroute")
    claims.append(
        f"dim {e.dim}: zeroing the expert super weight {matrix}{index} {'removes' if row.confirms else 'does not remove'} it "
        f"(block {e.layer}: {row.value_birth:+.1f}) and multiplies {run.metric} by {row.perplexity_ratio:.2f}; zeroing a weight of "
        f"the same size elsewhere in that expert: x{control_row.perplexity_ratio:.2f}"
        + (f"; routing the token past expert {w.expert} (the router picks among the others) "
           f"{'removes' if rerouted.confirms else 'does not remove'} it ({rerouted.value_birth:+.1f})" if rerouted else "")
    )
    return rows


def _replacement_rows(run: _Run, layer: int, replaced: dict[str, dict[int, dict[int, float]]], scores: dict[str, float],
                      claims: list[str]) -> list[Intervention]:
    """The zero and mean replacements at one birth block; their scores (``scores``, by target) were measured with the
    output effects. The value is what the intervention writes at the massive positions; it is not measured after it."""
    dims = list(replaced["zero"][layer])
    baseline = run.measure.baseline
    rows = []
    for label in ("zero", "mean"):
        target = f"{label} {layer}:{dims}"
        ppl, value = scores[target], replaced[label][layer][dims[0]]
        still = run.findings.criterion.is_massive(value, run.findings.medians[layer])
        rows.append(Intervention(name=f"set massive dims {dims} to {label} at block {layer}", target=target, dim=dims[0], layer=layer,
                                 value_birth=value, value_last=float("nan"), still_massive=still, perplexity=ppl,
                                 perplexity_ratio=ppl / baseline, confirms=None))
    zero, mean = rows
    claims.append(
        f"block {layer}: setting the massive activations of dims {dims} to zero gives {run.metric} {zero.perplexity:.2f} "
        f"(x{zero.perplexity_ratio:.2f}); to their mean over the texts, {mean.perplexity:.2f} (x{mean.perplexity_ratio:.2f}); "
        f"unmodified {baseline:.2f}"
    )
    return rows


def _dependence_claim(d: InputDependence) -> str:
    constant = d.first_token_std <= 0.1 * abs(d.first_token_mean)
    return (f"dim {d.dim} at block {d.layer} over {d.inputs} inputs: first token {d.first_token_mean:+.1f} +/- {d.first_token_std:.1f} "
            f"({'a near-constant bias' if constant else 'input-dependent'}); massive on the first token in {d.first_token_massive} "
            f"of {d.inputs} inputs and at {d.other_positions} other position(s)")


def _effect_claim(effect: OutputEffect) -> str:
    return (f"{effect.name}: KL from the unmodified model {effect.kl:.3g} nats per token; probability on stopwords "
            f"{effect.stopword_before:.1%} -> {effect.stopword_after:.1%}, on punctuation {effect.punctuation_before:.1%} -> "
            f"{effect.punctuation_after:.1%}; rises most: {effect.rises[0].token!r} ({effect.rises[0].before:.2%} -> "
            f"{effect.rises[0].after:.2%})")


def _effect_interventions(lm: LoadedModel, attribution: list[Attribution], experts: list[ExpertAttribution], criterion: Criterion,
                          replaced: dict[str, dict[int, dict[int, float]]]) -> list[Edit]:
    """An ``Edit`` for each super weight's zeroing (dense, or inside an expert) and each zero/mean replacement; targets
    are spelled as the rows spell them, so their perplexities serve the rows. Each starts at its birth block."""
    found: dict[str, Edit] = {}
    weights = [(a.dim, a.layer, "super weight", a.super_weight.matrix, (a.super_weight.row, a.super_weight.col))
               for a in attribution if a.role == "birth"]
    weights += [(e.dim, e.layer, "expert super weight", expert_matrix(e.moe.super_weight.matrix, e.layer), tuple(e.moe.super_weight.index))
                for e in experts if e.role == "birth"]
    for dim, layer, label, matrix, index in weights:
        target = f"weight {matrix}{list(index)}"
        found.setdefault(target, Edit(f"dim {dim}: zero {label} {list(index)}", target,
                                      lambda matrix=matrix, index=index: set_weight(lm, matrix, index), layer))
    for layer in sorted(replaced["zero"]):
        dims = list(replaced["zero"][layer])
        for label in ("zero", "mean"):
            values = replaced[label][layer]
            found[f"{label} {layer}:{dims}"] = Edit(
                f"set massive dims {dims} to {label} at block {layer}", f"{label} {layer}:{dims}",
                lambda layer=layer, values=values: replace_massive(lm, layer, values, criterion), layer)
    return list(found.values())


def replacement_values(dims: list[DimSummary], massive: list[Massive]) -> dict[str, dict[int, dict[int, float]]]:
    """What the zero and mean replacements write (Sun et al.): label -> birth block -> {dim: value}, the mean being
    over the dim's ``massive`` entries at that block."""
    births = [(d.born_at, d.dim) for d in sorted(dims, key=lambda d: -abs(d.max_value))]  # strongest dim first
    found: dict[str, dict[int, dict[int, float]]] = {"zero": {}, "mean": {}}
    for layer, dim in births:
        found["zero"].setdefault(layer, {})[dim] = 0.0
        found["mean"].setdefault(layer, {})[dim] = _mean([m.value for m in massive if m.dim == dim and m.layer == layer])
    return found


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _unrelated_neuron(a: Attribution) -> int:
    """The lowest-numbered neuron not among the listed top contributors: a control that should change nothing."""
    listed = {n.neuron for n in a.neurons}
    return next(i for i in range(len(listed) + 1) if i not in listed)


def _neuron_column(index: tuple[int, ...], transposed: bool) -> tuple:
    """The stored index of everything a neuron writes, from its super weight's index ([expert,] row, neuron, or
    ``transposed`` [expert,] neuron, row; the row a residual dim, or latent experts' latent unit): the row's place
    takes every row."""
    place = len(index) - 1 if transposed else len(index) - 2
    return tuple(slice(None) if i == place else value for i, value in enumerate(index))


def _similar_weight(weight: torch.Tensor, row: int, col: int) -> tuple[int, int, float]:
    """The entry of the same 2-D matrix closest in |w| to the super weight, outside its row and column."""
    target = weight[row, col].abs()
    distance = (weight.abs() - target).abs()
    distance[row, :] = float("inf")
    distance[:, col] = float("inf")
    flat = int(distance.argmin())
    r, c = divmod(flat, weight.shape[1])
    return r, c, float(weight[r, c])


def input_dependence(lm: LoadedModel, eval_text: str, *, texts: dict[int, str], dims: list[DimSummary],
                     criterion: Criterion) -> list[InputDependence]:
    """Over the scanned texts (``texts``: the kept windows, by index) and the evaluation text's sentences: each dim's
    value on the first token at its birth block, and every token where it is massive. Forward passes of a few texts
    each, up to the last birth block."""
    ids = dependence_inputs(lm, eval_text, texts)
    births = sorted({d.born_at for d in dims})
    read: list[dict[int, tuple[float, list[int]]]] = [{} for _ in ids]
    for group in dependence_groups(ids):
        batch, mask = pad_batch([ids[i] for i in group])  # right padding: every real token is computed as alone
        kept: dict[int, torch.Tensor] = {}
        keep = lambda layer, site, h, kept=kept: kept.__setitem__(layer, h.detach().float())
        with torch.no_grad(), tap(lm.model, lm.adapter, [(layer, lm.adapter.stream) for layer in births], keep):
            forward_until(lm.model, lm.adapter, max(births), input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device),
                          use_cache=False)
        read_group(kept, group, ids, dims, criterion, read)
    return dependence_from(lm, ids, read, dims)


def dependence_inputs(lm: LoadedModel, eval_text: str, texts: dict[int, str]) -> list[torch.Tensor]:
    """The input dependence's texts as ids [1, n]: the kept windows first (up to MAX_INPUTS), then the evaluation
    text's sentences, MAX_INPUTS in all, each cut to the model's context."""
    sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+|\n+", eval_text) if len(s.split()) >= 4]
    read_texts = ([texts[i] for i in sorted(texts) if i < MAX_INPUTS] + sentences)[:MAX_INPUTS]
    limit = getattr(lm.config, "max_position_embeddings", None) or 4096
    return [lm.tokenizer(text, return_tensors="pt").input_ids[:, :limit] for text in read_texts]  # long sentences: their start is enough


def dependence_groups(ids: list[torch.Tensor]) -> list[list[int]]:
    """The texts' indices in batches of DEPENDENCE_BATCH, texts of like length together: little padding."""
    by_length = sorted(range(len(ids)), key=lambda i: ids[i].shape[1])
    return [by_length[start:start + DEPENDENCE_BATCH] for start in range(0, len(ids), DEPENDENCE_BATCH)]


def read_group(kept: dict[int, torch.Tensor], group: list[int], ids: list[torch.Tensor], dims: list[DimSummary],
               criterion: Criterion, read: list[dict[int, tuple[float, list[int]]]]) -> None:
    """Per text of a padded batch and dim: its value on the first token and the positions where it is massive, at the
    dim's birth block (``kept``: block -> that batch's detection stream), into ``read`` (by text)."""
    for row, index in enumerate(group):
        for summary in dims:
            hidden = kept[summary.born_at][row:row + 1, :ids[index].shape[1]]
            massive = massive_mask(hidden, summary.dim, criterion)[0]
            read[index][summary.dim] = float(at_dim(hidden, summary.dim)[0, 0]), massive.nonzero().flatten().tolist()


def dependence_from(lm: LoadedModel, ids: list[torch.Tensor], read: list[dict[int, tuple[float, list[int]]]],
                    dims: list[DimSummary]) -> list[InputDependence]:
    """Each dim's input dependence from every text's ``read_group``."""
    numbers = [d.dim for d in dims]
    first: dict[int, list[float]] = {dim: [] for dim in numbers}
    carriers: dict[int, Counter] = {dim: Counter() for dim in numbers}
    first_massive = dict.fromkeys(numbers, 0)
    others = dict.fromkeys(numbers, 0)
    for one, found in zip(ids, read):  # in the texts' order, so that tied carriers keep their order
        for dim, (value, positions) in found.items():
            first[dim].append(value)
            first_massive[dim] += 0 in positions
            for position in positions:
                carriers[dim][lm.tokenizer.decode([int(one[0, position])])] += 1
                others[dim] += position > 0
    found = []
    for summary in dims:
        values = torch.tensor(first[summary.dim], dtype=torch.float64)
        found.append(
            InputDependence(dim=summary.dim, layer=summary.born_at, inputs=len(ids), first_token_mean=float(values.mean()),
                            first_token_std=float(values.std()) if len(values) > 1 else 0.0, first_token_massive=first_massive[summary.dim],
                            carriers=[[token, count] for token, count in carriers[summary.dim].most_common(8)],
                            other_positions=others[summary.dim])
        )
    return found


def _values_at(birth: int, value_birth: float, last: int, value_last: float) -> str:
    """'at block 2: +0.3; at block 20: +1.2', or one clause where the birth block is the last massive one."""
    first = f"at block {birth}: {value_birth:+.1f}"
    return first if last == birth else f"{first}; at block {last}: {value_last:+.1f}"
