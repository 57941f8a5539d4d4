"""Causal checks of what the scan named: ablate neurons, zero the super weight, replace the massive values,
and measure the massive value and the perplexity each time; plus how much the value depends on the input."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

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
from .results import InputDependence, Intervention, OutputEffect, Verification

ABLATE_ALONE = 3  # top neurons ablated one at a time
MAX_INPUTS = 64  # inputs for the input-dependence pass
DEPENDENCE_BATCH = 16  # of those inputs per forward pass


@dataclass
class _Run:
    """What every step of the verification shares: the model, the massive dims with each block's median |a| and the
    criterion that calls a value massive, the scanned texts' ids, the scored
    evaluation (whose cache holds each target's score, measured once) and the progress callback."""

    lm: LoadedModel
    dims: list[DimSummary]
    medians: list[float]
    criterion: Criterion
    inputs: dict[int, torch.Tensor]
    evaluation: Evaluation | EmbeddingEvaluation
    step: Callable[[], None]
    findings: Findings  # with hyper-connections, each stream's median |a| (``median``)

    def median(self, layer: int, stream: str) -> float:
        """What a value in ``stream`` of block ``layer`` is judged against: the stream's own median |a| (the scan's
        criterion), or the block's where there is one stream."""
        return self.findings.stream_medians(stream)[layer]

    @property
    def baseline(self) -> float:
        return self.evaluation.baseline

    @property
    def metric(self) -> str:
        if isinstance(self.evaluation, EmbeddingEvaluation):
            return "1 + embedding cosine distance"
        return "exp(masked-LM loss)" if self.lm.adapter.encoder else "perplexity"

    def last_block(self, dim: int) -> int:
        return next(d.persists[-1] for d in self.dims if d.dim == dim)


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
    dims, medians, criterion, massive, texts = findings.dims, findings.medians, findings.criterion, findings.massive, findings.texts
    attribution, experts = mechanism.attribution, mechanism.experts
    if evaluation.text is None:
        raise ValueError("verify_by_intervention needs the scoring evaluation_for makes (it names its evaluation text)")
    eval_text, eval_source = evaluation.text.text, evaluation.text.source
    run = _Run(lm, dims, medians, criterion, inputs, evaluation, step, findings)
    replaced = replacement_values(dims, massive)
    headless = isinstance(run.evaluation, EmbeddingEvaluation)
    # What the output loses under the super weights' zeroing and the replacements, in one pass over the windows; the
    # perplexities it measures on the way serve the rows below.
    effects = _effect_interventions(lm, attribution, experts, criterion, replaced)
    found = [] if headless else output_effects(lm, run.evaluation, effects)
    changed = embedding_changes(lm, run.evaluation.reference, [(e.name, e.target, e.context) for e in effects]) if headless else []
    run.evaluation.cache.update({"baseline": run.baseline, **{e.target: e.perplexity for e in [*found, *changed]}})
    step()
    rows: list[Intervention] = []
    claims: list[str] = []
    for a in (a for a in attribution if a.role == "birth"):
        rows += _dense_rows(run, a, claims)
    for e in (e for e in experts if e.role == "birth"):  # mixture of experts: the weight inside the expert
        rows += _expert_rows(run, e, claims)
    for layer in sorted(replaced["zero"]):
        rows += _replacement_rows(run, layer, replaced, claims)
    dependence = input_dependence(lm, eval_text, texts=texts, dims=dims, criterion=criterion)
    claims += [_dependence_claim(d) for d in dependence] + [_effect_claim(effect) for effect in found]
    if headless:
        claims.append(f"headless encoder (the checkpoint has no masked-LM head to score): verified by its embeddings of "
                      f"{len(run.evaluation.reference.mean)} evaluation sentences; the perplexity columns hold 1 + (1 - their "
                      "cosine to the unmodified model's)")
        claims += [embedding_claim(c) for c in changed]
        return Verification(baseline_perplexity=run.baseline, eval_tokens=run.evaluation.positions, eval_source=eval_source,
                            interventions=rows, input_dependence=dependence, claims=claims, metric="embeddings",
                            embedding_changes=changed)
    masked_loss = run.evaluation.baseline_nll / run.evaluation.positions if lm.adapter.encoder else None
    eval_tokens = run.evaluation.positions if lm.adapter.encoder else int(sum(b.mask.sum() for b in run.evaluation.batches))
    return Verification(baseline_perplexity=run.baseline, eval_tokens=eval_tokens, eval_source=eval_source, interventions=rows,
                        input_dependence=dependence, claims=claims, metric="masked-LM" if lm.adapter.encoder else "perplexity",
                        masked_lm_loss=masked_loss, output_effects=found)


def _measure(run: _Run, name: str, target: str, a: Attribution | ExpertAttribution, context: AbstractContextManager,
             with_ppl: bool) -> Intervention:
    """One intervention at the attribution's block: the massive value at the birth and last blocks on the carrier's
    text (with hyper-connections, in the attribution's stream), and (``with_ppl``) the score, from the birth block on,
    once per target."""
    last = run.last_block(a.dim)
    with context:
        values = read_coordinate(run.lm, run.inputs[a.text], sorted({a.layer, last}), a.position, a.dim, a.stream)
        ppl = run.evaluation.score(a.layer, key=target) if with_ppl else None
    run.step()
    still = run.criterion.is_massive(values[a.layer], run.median(a.layer, a.stream))
    return Intervention(name=name, target=target, dim=a.dim, layer=a.layer, value_birth=values[a.layer], value_last=values[last],
                        still_massive=still, perplexity=ppl, perplexity_ratio=ppl / run.baseline if ppl is not None else None,
                        confirms=None)


def _zero_super_weight(run: _Run, a: Attribution | ExpertAttribution, label: str, matrix: str, index: tuple[int, ...]
                       ) -> tuple[Intervention, Intervention]:
    """Zero the super weight (index as stored), then, as a control, the entry closest to it in |w| in the same
    matrix (one expert's matrix in fused expert weights), outside its row and column."""
    lm = run.lm
    row = _measure(run, f"zero {label} {list(index)}", f"weight {matrix}{list(index)}", a, set_weight(lm, matrix, index), True)
    row.confirms = not row.still_massive
    r, c, value = _similar_weight(lm.model.get_parameter(matrix).detach()[index[:-2]], *index[-2:])
    control = (*index[:-2], r, c)
    control_row = _measure(run, f"control: zero weight {list(control)} ({value:+.3f})", f"weight {matrix}{list(control)}", a,
                           set_weight(lm, matrix, control), True)
    return row, control_row


def _dense_rows(run: _Run, a: Attribution, claims: list[str]) -> list[Intervention]:
    """A dense MLP's birth: the baseline, its top neurons ablated alone and together, an unrelated neuron, the super
    weight and its control; the claims they support are appended to ``claims``."""
    lm, metric, last = run.lm, run.metric, run.last_block(a.dim)
    rows = [_measure(run, "none (baseline)", "baseline", a, nullcontext(), True)]
    toward = [n for n in a.neurons if n.contribution * a.output > 0]
    for n in toward[:ABLATE_ALONE]:
        rows.append(_measure(run, f"ablate neuron {n.neuron}", f"neuron {a.layer}:{n.neuron}", a, ablate_neurons(lm, a.layer, [n.neuron]),
                             False))
    top_set = [n.neuron for n in toward[: max(a.neurons_for_90pct, 1)]]
    row = _measure(run, f"ablate top {len(top_set)} neuron(s) {top_set}", f"neurons {a.layer}:{top_set}", a,
                   ablate_neurons(lm, a.layer, top_set), True)
    row.confirms = not row.still_massive
    rows.append(row)
    claims.append(
        f"dim {a.dim}: ablating neuron(s) {top_set} of block {a.layer} {'removes' if row.confirms else 'does not remove'} the massive "
        f"activation ({_values_at(a.layer, row.value_birth, last, row.value_last)}); {metric} x{row.perplexity_ratio:.2f}"
    )
    control = _unrelated_neuron(a)
    rows.append(_measure(run, f"control: ablate neuron {control}", f"neuron {a.layer}:{control}", a, ablate_neurons(lm, a.layer, [control]),
                         False))
    w = a.super_weight
    row, control_row = _zero_super_weight(run, a, "super weight", w.matrix, (w.row, w.col))
    claims.append(
        f"dim {a.dim}: zeroing the super weight {w.matrix}[{w.row}, {w.col}] {'removes' if row.confirms else 'does not remove'} it "
        f"(block {a.layer}: {row.value_birth:+.1f}) and multiplies {metric} by {row.perplexity_ratio:.2f}; "
        f"zeroing a weight of the same size elsewhere in the matrix: x{control_row.perplexity_ratio:.2f}"
    )
    return rows + [row, control_row]


def _expert_rows(run: _Run, e: ExpertAttribution, claims: list[str]) -> list[Intervention]:
    """A birth inside an expert: the baseline, the writing neuron (its down-projection column zeroed: inside fused
    expert weights no hook sees the neuron), the expert super weight and its control."""
    lm = run.lm
    rows = [_measure(run, "none (baseline)", "baseline", e, nullcontext(), True)]
    w = e.moe.super_weight
    matrix, index = expert_matrix(w.matrix, e.layer), tuple(w.index)
    column = _neuron_column(index, w.expert is not None and lm.at(e.layer).moe.experts.transposed)
    where = "the shared expert" if w.expert is None else f"expert {w.expert}"
    row = _measure(run, f"ablate neuron {w.neuron} of {where}", f"neuron {matrix}[{w.expert}]:{w.neuron}", e,
                   set_weight(lm, matrix, column), True)
    row.confirms = not row.still_massive
    rows.append(row)
    row, control_row = _zero_super_weight(run, e, "expert super weight", matrix, index)
    rerouted = []
    if w.expert is not None:  # the token goes to the experts the router picks without it (every token of that block)
        rerouted.append(_measure(run, f"re-route: prune expert {w.expert}", f"prune {e.layer}:[{w.expert}]", e,
                                 pruned_experts(lm, {e.layer: [w.expert]}), True))
        rerouted[0].confirms = not rerouted[0].still_massive
    claims.append(
        f"dim {e.dim}: zeroing the expert super weight {matrix}{list(index)} {'removes' if row.confirms else 'does not remove'} it "
        f"(block {e.layer}: {row.value_birth:+.1f}) and multiplies {run.metric} by {row.perplexity_ratio:.2f}; zeroing a weight of "
        f"the same size elsewhere in that expert: x{control_row.perplexity_ratio:.2f}"
        + (f"; routing the token past expert {w.expert} (the router picks among the others) "
           f"{'removes' if rerouted[0].confirms else 'does not remove'} it ({rerouted[0].value_birth:+.1f})" if rerouted else "")
    )
    return rows + [row, control_row, *rerouted]


def _replacement_rows(run: _Run, layer: int, replaced: dict[str, dict[int, dict[int, float]]], claims: list[str]) -> list[Intervention]:
    """The zero and mean replacements at one birth block; their perplexities were measured with the output effects.
    The value is what the intervention writes at the massive positions; it is not measured after it."""
    dims = list(replaced["zero"][layer])
    rows = []
    for label in ("zero", "mean"):
        target = f"{label} {layer}:{dims}"
        ppl, value = run.evaluation.cache[target], replaced[label][layer][dims[0]]
        still = run.criterion.is_massive(value, run.medians[layer])
        rows.append(Intervention(name=f"set massive dims {dims} to {label} at block {layer}", target=target, dim=dims[0], layer=layer,
                                 value_birth=value, value_last=float("nan"), still_massive=still, perplexity=ppl,
                                 perplexity_ratio=ppl / run.baseline, confirms=None))
    zero, mean = rows
    claims.append(
        f"block {layer}: setting the massive activations of dims {dims} to zero gives {run.metric} {zero.perplexity:.2f} "
        f"(x{zero.perplexity_ratio:.2f}); to their mean over the texts, {mean.perplexity:.2f} (x{mean.perplexity_ratio:.2f}); "
        f"unmodified {run.baseline:.2f}"
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
    sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+|\n+", eval_text) if len(s.split()) >= 4]
    read_texts = ([texts[i] for i in sorted(texts) if i < MAX_INPUTS] + sentences)[:MAX_INPUTS]
    limit = getattr(lm.config, "max_position_embeddings", None) or 4096
    numbers = [d.dim for d in dims]
    first: dict[int, list[float]] = {dim: [] for dim in numbers}
    carriers: dict[int, Counter] = {dim: Counter() for dim in numbers}
    first_massive = dict.fromkeys(numbers, 0)
    others = dict.fromkeys(numbers, 0)
    births = {d.born_at for d in dims}
    ids = [lm.tokenizer(text, return_tensors="pt").input_ids[:, :limit] for text in read_texts]  # long sentences: their start is enough
    # Per text and dim: its value on the first token and the positions where it is massive, at the dim's birth block.
    read: list[dict[int, tuple[float, list[int]]]] = [{} for _ in read_texts]
    by_length = sorted(range(len(ids)), key=lambda i: ids[i].shape[1])  # texts of like length together: little padding
    for start in range(0, len(ids), DEPENDENCE_BATCH):
        group = by_length[start:start + DEPENDENCE_BATCH]
        batch, mask = pad_batch([ids[i] for i in group])  # right padding: every real token is computed as alone
        kept: dict[int, torch.Tensor] = {}
        sites = [(layer, lm.adapter.stream) for layer in births]
        keep = lambda layer, site, h, kept=kept: kept.__setitem__(layer, h.detach().float())
        with torch.no_grad(), tap(lm.model, lm.adapter, sites, keep):
            forward_until(lm.model, lm.adapter, max(births), input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device),
                          use_cache=False)
        for row, index in enumerate(group):
            for summary in dims:
                hidden = kept[summary.born_at][row:row + 1, :ids[index].shape[1]]
                massive = massive_mask(hidden, summary.dim, criterion)[0]
                read[index][summary.dim] = float(at_dim(hidden, summary.dim)[0, 0]), massive.nonzero().flatten().tolist()
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
            InputDependence(dim=summary.dim, layer=summary.born_at, inputs=len(read_texts), first_token_mean=float(values.mean()),
                            first_token_std=float(values.std()) if len(values) > 1 else 0.0, first_token_massive=first_massive[summary.dim],
                            carriers=[[token, count] for token, count in carriers[summary.dim].most_common(8)],
                            other_positions=others[summary.dim])
        )
    return found


def _values_at(birth: int, value_birth: float, last: int, value_last: float) -> str:
    """'at block 2: +0.3; at block 20: +1.2', or one clause where the birth block is the last massive one."""
    first = f"at block {birth}: {value_birth:+.1f}"
    return first if last == birth else f"{first}; at block {last}: {value_last:+.1f}"
