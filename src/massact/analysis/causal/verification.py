"""Causal checks of what the scan named: ablate neurons, zero the super weight, replace the massive values,
and measure the massive value and the perplexity each time; plus how much the value depends on the input."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ...capture.hooks import tap
from ...models.loading import LoadedModel
from ...capture.edits import ablate_neurons, massive_mask, read_coordinate, replace_massive, set_weight
from .embeddings import changes as embedding_changes, claim as embedding_claim, headless, scorer as embedding_scorer
from .mlm import exp_loss, masked_lm_loss, masked_windows, next_token_windows
from .output_effects import output_effects
from .perplexity import eval_windows, perplexity
from ..mechanism.results import Attribution, ExpertAttribution
from .results import InputDependence, Intervention, Verification
from ..results import Report

ABLATE_ALONE = 3  # top neurons ablated one at a time
MAX_INPUTS = 64  # inputs for the input-dependence pass


def verify(
    lm: LoadedModel, report: Report, inputs: list[torch.Tensor], eval_text: str, eval_source: str,
    step: Callable[[], None] = lambda: None,
) -> Verification:
    """Every intervention on every born dim with an MLP attribution; ``step`` is called after each one.

    A causal LM is scored by its perplexity on ``eval_text``; an encoder by exp(masked-LM loss) on a fixed, seeded
    15% of its tokens, the same masks for every intervention. The super-weight zeroing and the zero/mean replacements
    also get their effect on the output distributions (``output_effects``)."""
    ref = None
    if headless(lm):  # no head to score: its embeddings (see embeddings.py)
        ref, score = embedding_scorer(lm, eval_text)
        scored, masked_loss, eval_tokens, baseline = [], None, ref.tokens, 1.0
    elif lm.adapter.encoder:
        scored = masked_windows(lm, eval_text)

        def score() -> float:
            return exp_loss(masked_lm_loss(lm, scored)[0])

        masked_loss, eval_tokens = masked_lm_loss(lm, scored)
        baseline = exp_loss(masked_loss)
    else:
        windows = eval_windows(lm, eval_text)
        scored = next_token_windows(windows)

        def score() -> float:
            return perplexity(lm, windows)

        masked_loss, eval_tokens = None, sum(w.shape[1] for w in windows)
        baseline = score()
    metric = "1 + embedding cosine distance" if ref else "exp(masked-LM loss)" if lm.adapter.encoder else "perplexity"
    criterion = report.criterion
    replaced = replacement_values(report)
    # What the output loses under the super weights' zeroing and the replacements, in one pass over the windows; the
    # perplexities it measures on the way serve the rows below.
    effects = _effect_interventions(lm, report, replaced)
    found = output_effects(lm, scored, effects) if ref is None else []
    changed = embedding_changes(lm, ref, effects) if ref is not None else []
    step()
    rows: list[Intervention] = []
    claims: list[str] = []
    cache: dict[str, float] = {"baseline": baseline, **{e.target: e.perplexity for e in [*found, *changed]}}  # per target, measured once
    last_block = {d.dim: d.persists[-1] for d in report.dims}

    def measure(name: str, target: str, a: Attribution | ExpertAttribution, context: AbstractContextManager, with_ppl: bool) -> Intervention:
        last = last_block[a.dim]
        median_birth = report.layers[a.layer].median
        with context:
            values = read_coordinate(lm, inputs[a.text], sorted({a.layer, last}), a.position, a.dim)
            if with_ppl and target not in cache:
                cache[target] = score()
        ppl = cache.get(target) if with_ppl else None
        step()
        birth_value = values[a.layer]
        still = criterion.is_massive(birth_value, median_birth)
        return Intervention(name=name, target=target, dim=a.dim, layer=a.layer, value_birth=birth_value, value_last=values[last], still_massive=still, perplexity=ppl,
                            perplexity_ratio=ppl / baseline if ppl is not None else None, confirms=None)

    def zero_super_weight(a: Attribution | ExpertAttribution, label: str, matrix: str, index: tuple[int, ...]) -> tuple[Intervention, Intervention]:
        """Zero the super weight (index as stored), then, as a control, the entry closest to it in |w| in the same
        matrix (one expert's matrix in fused expert weights), outside its row and column."""
        row = measure(f"zero {label} {list(index)}", f"weight {matrix}{list(index)}", a, set_weight(lm, matrix, index), True)
        row.confirms = not row.still_massive
        r, c, value = _similar_weight(lm.model.get_parameter(matrix).detach()[index[:-2]], *index[-2:])
        control = (*index[:-2], r, c)
        control_row = measure(f"control: zero weight {list(control)} ({value:+.3f})", f"weight {matrix}{list(control)}", a,
                              set_weight(lm, matrix, control), True)
        return row, control_row

    for a in (a for a in report.attribution if a.role == "birth"):
        rows.append(measure("none (baseline)", "baseline", a, nullcontext(), True))
        toward = [n for n in a.neurons if n.contribution * a.output > 0]
        for n in toward[:ABLATE_ALONE]:
            rows.append(measure(f"ablate neuron {n.neuron}", f"neuron {a.layer}:{n.neuron}", a, ablate_neurons(lm, a.layer, [n.neuron]), False))
        top_set = [n.neuron for n in toward[: max(a.neurons_for_90pct, 1)]]
        row = measure(f"ablate top {len(top_set)} neuron(s) {top_set}", f"neurons {a.layer}:{top_set}", a, ablate_neurons(lm, a.layer, top_set), True)
        row.confirms = not row.still_massive
        rows.append(row)
        claims.append(
            f"dim {a.dim}: ablating neuron(s) {top_set} of block {a.layer} {'removes' if row.confirms else 'does not remove'} the massive "
            f"activation (at block {a.layer}: {row.value_birth:+.1f}; at block {last_block[a.dim]}: "
            f"{row.value_last:+.1f}); {metric} x{row.perplexity_ratio:.2f}"
        )
        control = _unrelated_neuron(a)
        rows.append(measure(f"control: ablate neuron {control}", f"neuron {a.layer}:{control}", a, ablate_neurons(lm, a.layer, [control]), False))

        w = a.super_weight
        row, control_row = zero_super_weight(a, "super weight", w.matrix, (w.row, w.col))
        rows += [row, control_row]
        claims.append(
            f"dim {a.dim}: zeroing the super weight {w.matrix}[{w.row}, {w.col}] {'removes' if row.confirms else 'does not remove'} it "
            f"(block {a.layer}: {row.value_birth:+.1f}) and multiplies {metric} by {row.perplexity_ratio:.2f}; "
            f"zeroing a weight of the same size elsewhere in the matrix: x{control_row.perplexity_ratio:.2f}"
        )

    for e in (e for e in report.experts if e.role == "birth"):  # mixture of experts: the weight inside the expert
        rows.append(measure("none (baseline)", "baseline", e, nullcontext(), True))
        w = e.moe.super_weight
        matrix, index = lm.adapter.param_name(lm.model, e.layer, "mlp", w.matrix), tuple(w.index)
        # Inside fused expert weights no hook sees the neuron: ablate it by zeroing its down-projection column.
        column = _neuron_column(index, w.dim, w.neuron)
        where = "the shared expert" if w.expert is None else f"expert {w.expert}"
        row = measure(f"ablate neuron {w.neuron} of {where}", f"neuron {matrix}[{w.expert}]:{w.neuron}", e,
                      set_weight(lm, matrix, column), True)
        row.confirms = not row.still_massive
        rows.append(row)
        row, control_row = zero_super_weight(e, "expert super weight", matrix, index)
        rows += [row, control_row]
        claims.append(
            f"dim {e.dim}: zeroing the expert super weight {matrix}{list(index)} {'removes' if row.confirms else 'does not remove'} it "
            f"(block {e.layer}: {row.value_birth:+.1f}) and multiplies {metric} by {row.perplexity_ratio:.2f}; zeroing a weight of "
            f"the same size elsewhere in that expert: x{control_row.perplexity_ratio:.2f}"
        )

    for layer in sorted(replaced["zero"]):
        dims = list(replaced["zero"][layer])
        for label in ("zero", "mean"):
            values = replaced[label][layer]
            ppl = cache[f"{label} {layer}:{dims}"]  # measured with the output effects
            # The value is what the intervention writes at the massive positions; it is not measured after it.
            value = values[dims[0]]
            still = criterion.is_massive(value, report.layers[layer].median)
            rows.append(Intervention(name=f"set massive dims {dims} to {label} at block {layer}", target=f"{label} {layer}:{dims}", dim=dims[0], layer=layer,
                                     value_birth=value, value_last=float("nan"), still_massive=still, perplexity=ppl, perplexity_ratio=ppl / baseline, confirms=None))
        zero, mean = rows[-2], rows[-1]
        claims.append(
            f"block {layer}: setting the massive activations of dims {dims} to zero gives {metric} {zero.perplexity:.2f} "
            f"(x{zero.perplexity_ratio:.2f}); to their mean over the texts, {mean.perplexity:.2f} (x{mean.perplexity_ratio:.2f}); "
            f"unmodified {baseline:.2f}"
        )

    dependence = input_dependence(lm, report, eval_text)
    for d in dependence:
        constant = d.first_token_std <= 0.1 * abs(d.first_token_mean)
        claims.append(
            f"dim {d.dim} at block {d.layer} over {d.inputs} inputs: first token {d.first_token_mean:+.1f} +/- {d.first_token_std:.1f} "
            f"({'a near-constant bias' if constant else 'input-dependent'}); massive on the first token in {d.first_token_massive} "
            f"of {d.inputs} inputs and at {d.other_positions} other position(s)"
        )
    for effect in found:
        claims.append(
            f"{effect.name}: KL from the unmodified model {effect.kl:.3g} nats per token; probability on stopwords "
            f"{effect.stopword_before:.1%} -> {effect.stopword_after:.1%}, on punctuation {effect.punctuation_before:.1%} -> "
            f"{effect.punctuation_after:.1%}; rises most: {effect.rises[0].token!r} ({effect.rises[0].before:.2%} -> "
            f"{effect.rises[0].after:.2%})"
        )
    if ref is not None:
        claims.append(f"headless encoder (the checkpoint has no masked-LM head to score): verified by its embeddings of "
                      f"{len(ref.mean)} evaluation sentences; the perplexity columns hold 1 + (1 - their cosine to the unmodified model's)")
        claims += [embedding_claim(c) for c in changed]
    return Verification(baseline_perplexity=baseline, eval_tokens=eval_tokens, eval_source=eval_source, interventions=rows, input_dependence=dependence, claims=claims,
                        metric="embeddings" if ref else "masked-LM" if lm.adapter.encoder else "perplexity", masked_lm_loss=masked_loss,
                        output_effects=found, embedding_changes=changed)


def _effect_interventions(lm: LoadedModel, report: Report, replaced: dict[str, dict[int, dict[int, float]]]
                          ) -> list[tuple[str, str, Callable[[], AbstractContextManager]]]:
    """(name, target, context factory) for each super weight's zeroing (dense, or inside an expert) and each zero/mean
    replacement; targets are spelled as the rows spell them, so their perplexities serve the rows."""
    found: dict[str, tuple[str, str, Callable[[], AbstractContextManager]]] = {}
    weights = [(a.dim, "super weight", a.super_weight.matrix, (a.super_weight.row, a.super_weight.col))
               for a in report.attribution if a.role == "birth"]
    weights += [(e.dim, "expert super weight", lm.adapter.param_name(lm.model, e.layer, "mlp", e.moe.super_weight.matrix),
                 tuple(e.moe.super_weight.index)) for e in report.experts if e.role == "birth"]
    for dim, label, matrix, index in weights:
        target = f"weight {matrix}{list(index)}"
        found.setdefault(target, (f"dim {dim}: zero {label} {list(index)}", target,
                                  lambda matrix=matrix, index=index: set_weight(lm, matrix, index)))
    criterion = report.criterion
    for layer in sorted(replaced["zero"]):
        dims = list(replaced["zero"][layer])
        for label in ("zero", "mean"):
            values = replaced[label][layer]
            found[f"{label} {layer}:{dims}"] = (
                f"set massive dims {dims} to {label} at block {layer}", f"{label} {layer}:{dims}",
                lambda layer=layer, values=values: replace_massive(lm, layer, values, criterion))
    return list(found.values())


def replacement_values(report: Report) -> dict[str, dict[int, dict[int, float]]]:
    """What the zero and mean replacements write (Sun et al.): label -> birth block -> {dim: value}, the mean being
    over the dim's massive entries at that block."""
    births = [(d.born_at, d.dim) for d in sorted(report.dims, key=lambda d: -abs(d.max_value))]  # strongest dim first
    found: dict[str, dict[int, dict[int, float]]] = {"zero": {}, "mean": {}}
    for layer, dim in births:
        found["zero"].setdefault(layer, {})[dim] = 0.0
        found["mean"].setdefault(layer, {})[dim] = _mean([m.value for m in report.massive if m.dim == dim and m.layer == layer])
    return found


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _unrelated_neuron(a: Attribution) -> int:
    """The lowest-numbered neuron not among the listed top contributors: a control that should change nothing."""
    listed = {n.neuron for n in a.neurons}
    return next(i for i in range(len(listed) + 1) if i not in listed)


def _neuron_column(index: tuple[int, ...], dim: int, neuron: int) -> tuple:
    """The stored index of everything a neuron writes, from its super weight's index ([expert,] dim, neuron or
    [expert,] neuron, dim): the dim's place takes every row."""
    place = len(index) - 2 if index[-2:] == (dim, neuron) else len(index) - 1
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


def input_dependence(lm: LoadedModel, report: Report, eval_text: str) -> list[InputDependence]:
    """Over the scanned texts and the evaluation text's sentences: each dim's value on the first token at its birth
    block, and every token where it is massive. One forward pass per text and birth block, for all its dims."""
    sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+|\n+", eval_text) if len(s.split()) >= 4]
    texts = ([report.texts[i] for i in sorted(report.texts) if i < MAX_INPUTS] + sentences)[:MAX_INPUTS]
    limit = getattr(lm.model.config, "max_position_embeddings", None) or 4096
    dims = [d.dim for d in report.dims]
    first: dict[int, list[float]] = {dim: [] for dim in dims}
    carriers: dict[int, Counter] = {dim: Counter() for dim in dims}
    first_massive = dict.fromkeys(dims, 0)
    others = dict.fromkeys(dims, 0)
    births = {d.born_at for d in report.dims}
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :limit]  # long sentences: their start is enough
        kept: dict[int, torch.Tensor] = {}
        with torch.no_grad(), tap(lm.model, lm.adapter, [(layer, lm.adapter.stream) for layer in births], lambda l, s, h: kept.__setitem__(l, h.detach().float())):
            lm.model(input_ids=ids.to(lm.device), use_cache=False)
        for summary in report.dims:
            hidden, dim = kept[summary.born_at], summary.dim
            first[dim].append(float(hidden[0, 0, dim]))
            mask = massive_mask(hidden, dim, report.criterion)[0]
            first_massive[dim] += bool(mask[0])
            for position in mask.nonzero().flatten().tolist():
                carriers[dim][lm.tokenizer.decode([int(ids[0, position])])] += 1
                others[dim] += position > 0
    found = []
    for summary in report.dims:
        values = torch.tensor(first[summary.dim], dtype=torch.float64)
        found.append(
            InputDependence(dim=summary.dim, layer=summary.born_at, inputs=len(texts), first_token_mean=float(values.mean()),
                            first_token_std=float(values.std()) if len(values) > 1 else 0.0, first_token_massive=first_massive[summary.dim],
                            carriers=[[token, count] for token, count in carriers[summary.dim].most_common(8)], other_positions=others[summary.dim])
        )
    return found
