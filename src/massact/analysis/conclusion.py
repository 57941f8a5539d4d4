"""The conclusion: plain-language sentences built from the numbers above them in the report."""

from __future__ import annotations

from .mechanism.moe import MoeAttribution
from .detect.results import DimSummary
from .mechanism.results import Lifeline, NormFactors, Phase
from .results import Report
from .causal.results import SuperWeightStep
from .trigger.results import Trigger


_PLACES = {
    "mlp_gate": "the gate projection (mlp_gate)",
    "mlp_up": "the up projection (mlp_up)",
    "mlp_out": "the down projection (mlp_out)",
}


def _explosion_words(name: str, gated: bool) -> str:
    if name == "mlp_act":
        return "the gated product act(gate) x up (mlp_act)" if gated else "the activation function (mlp_act)"
    return _PLACES.get(name, name)


def _expert_words(m: MoeAttribution) -> str:
    routed = ", ".join(f"expert {e.expert} (router weight {e.router_weight:.3f}, {e.share:.1%})" for e in m.experts)
    text = f"the router sent it to {routed}"
    if m.shared_expert is not None:
        text += f" and the shared expert gives {m.shared_expert.share:.1%}"
    where = "the shared expert" if m.top_expert is None else f"expert {m.top_expert}"
    w = m.super_weight
    index = ", ".join(map(str, w.index))
    return (f"{text}; in {where}, neuron {m.neurons[0].neuron} gives {m.neurons[0].share:.1%} (router weight x act x weight); "
            f"super weight {w.matrix}[{index}] = {w.value:+.4f}, rank {w.rank} of {w.entries:,}")


def _norm_words(n: NormFactors, written: str, post_ln: bool) -> str:
    if post_ln:
        return (f"it exists only before the LayerNorm {n.parameter.removesuffix('.weight')}, which scales it by "
                f"{n.normalization:.3g} (1/std) x gain {n.gain:.3g} to {n.landed:+.2f} in the block output")
    factors = f"raw {n.raw:+.2f} x normalisation {n.normalization:.3g} x gain {n.gain:.4g} = {n.landed:+.1f}"
    if n.amplifier:
        return (f"the {written}'s own norm is the amplifier ({factors}): its gain on this dim is {n.gain_ratio:.0f}x its "
                f"median gain, so the norm weight {n.parameter}[{n.dim}] = {n.weight:+.4g} acts as a super weight")
    return f"the {written}'s own norm passes it on ({factors}; gain {n.gain_ratio:.1f}x its median)"


def conclude(report: Report) -> list[str]:
    """Plain-language sentences, one paragraph per massive dim, built from the numbers above them in the report: the
    mechanism as a chain a reader can follow from the token to the erasure."""
    if not report.dims:
        best = max(report.layers, key=lambda s: s.ratio)
        top = best.top[0]
        return [
            f"No massive activations under the criterion (|a| >= {report.criterion.min_abs:g} and >= "
            f"{report.criterion.min_ratio:g} x median): the largest top1/median is {best.ratio:.0f}x, dim {top.dim} "
            f"= {top.value:.1f} at block {best.layer}."
        ]
    paragraphs = []
    for summary in sorted(report.dims, key=lambda d: -abs(d.max_value)):
        line = next(x for x in report.lifeline if x.dim == summary.dim)  # the scan makes one per dim
        precursor = _precursor_words(line) if line.precursor_layer is not None else ""
        parts = [_birth_words(report, summary.dim, precursor)]
        trigger = next((t for t in report.trigger if t.dim == summary.dim), None)
        if trigger is not None and trigger.chain:
            parts.append(_trigger_words(trigger))
        parts.append(_fate_words(summary, line))
        steps = [s for s in report.super_weights if s.dim == summary.dim]
        if steps:
            parts.append(_super_weight_words(steps))
        paragraphs.append(" ".join(part for part in parts if part))
    return paragraphs


def _birth_words(report: Report, dim: int, precursor: str = "") -> str:
    birth = next(o for o in report.origin if o.dim == dim and o.role == "birth")
    written = {"mlp": "MLP", "attn": "attention"}[birth.writer]
    branch = birth.mlp if birth.writer == "mlp" else birth.attn
    stream = "the residual sum before the block's LayerNorm" if report.model.stream == "resid_sum" else "resid_out"
    text = (
        f"dim {dim} at token {birth.position} ({birth.token!r}){precursor} is born in block {birth.layer}, written by its "
        f"{written} ({branch:+.1f} of {stream} {birth.resid_out:+.1f}, resid_in was {birth.resid_in:+.1f})"
    )
    if birth.norm is not None:
        text += "; " + _norm_words(birth.norm, written, report.model.stream == "resid_sum")
    attribution = next((a for a in report.attribution if a.dim == dim and a.role == "birth"), None)
    anatomy = next((a for a in report.anatomy if a.dim == dim and a.role == "birth"), None)
    if attribution and anatomy:
        top = attribution.neurons[0]
        weight = attribution.super_weight
        count = attribution.neurons_for_90pct
        raw = " of the raw MLP output" if attribution.landed is not None else " of it"
        text += (
            f"; {count} neuron{'s' if count != 1 else ''} give 90%{raw}, neuron {top.neuron} alone "
            f"{top.share:.1%}; the explosion is at {_explosion_words(anatomy.explosion_point, report.model.gated)}; "
            f"super weight {weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f}, "
            f"rank {weight.rank} of {weight.entries:,} entries by |w|"
        )
    elif split := next((e.moe for e in report.experts if e.dim == dim and e.role == "birth"), None):
        text += "; " + _expert_words(split)
    elif birth.heads:
        head = birth.heads[0]
        text += f"; head {head.head} gives {head.share:.1%} of the attention output"
    return text + "."


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _phase_words(phase: Phase) -> str:
    who = {"mlp": "MLP", "attn": "attention", "norm": "norm"}[phase.writer]
    return f"{_blocks(phase.first, phase.last)}'s {who} ({phase.value_before:+,.1f} -> {phase.value_after:+,.1f})"


def _precursor_words(line: Lifeline) -> str:
    """A clause for the birth sentence: the smaller value the same dim and token carried first, and who erased it."""
    writes = [p for p in line.phases if p.name == "precursor"]
    erases = [p for p in line.phases if p.name == "precursor erasure"]
    sign = "" if (line.precursor >= 0) == (line.sign >= 0) else " (of the opposite sign)"
    text = f": a precursor of {line.precursor:+,.1f}{sign} is written first by " + ", ".join(map(_phase_words, writes))
    if erases:
        text += " and erased by " + ", ".join(map(_phase_words, erases))
    return text + "; then it"


def _trigger_words(trigger: Trigger) -> str:
    first, rest = trigger.chain[0], trigger.chain[1:]
    if first.kind != "neuron":
        return ""
    name = lambda link: "gate" if link.site == "mlp_gate" else "pre-activation"
    text = (f"Neuron {first.index} fires at token {trigger.position} because its {name(first)} is {first.value:+.1f} there against "
            f"{first.value_others:+.1f} on average at the other tokens")
    steps, previous = [], first
    for link in rest:
        step = f"{link.source} gives {link.source_here:+.1f} of that {name(previous)} ({link.source_others:+.1f} elsewhere)"
        previous = link
        if link.kind == "neuron":
            step += f", {link.feeds:+.1f} through neuron {link.index}, whose {name(link)} is {link.value:+.1f} there ({link.value_others:+.1f} elsewhere)"
        elif link.kind == "head" and link.attends:
            step += f", {link.feeds:+.1f} through head {link.index}, which attends to {link.attends[0][1]!r} ({link.attends[0][2]:.0%})"
        elif link.kind != "mlp":
            step += ", straight from the token"
        steps.append(step)
    if steps:
        text += ". Following the top source back: " + "; ".join(steps)
    if trigger.carriers is not None:
        text += f". It is {trigger.carriers.summary.split(':')[0]}"
    patch = next((p for p in trigger.patching if p.replacement != "zero"), None)
    if patch is not None:
        text += (f"; replacing {patch.source}'s output there by its mean over the other tokens changes the {name(first)} by "
                 f"{patch.total:+.1f} ({patch.direct:+.1f} directly) and leaves {patch.value_birth:+,.1f} at the birth block "
                 f"({'still massive' if patch.still_massive else 'not massive'})")
    return text + "."


def _fate_words(summary: DimSummary, line: Lifeline) -> str:
    last, count = summary.persists[-1], len(summary.persists)
    text = f"It is massive in block {last}" if count == 1 else f"It is massive in {count} blocks, {summary.born_at} to {last}"
    growth = [p for p in line.phases if p.name == "growth"]
    if growth:
        text += ", grows in " + ", ".join(map(_phase_words, growth))
    erasure = [p for p in line.phases if p.name == "erasure"]
    text += (", and is erased by " + ", ".join(map(_phase_words, erasure))) if erasure else ", and is never erased"
    medians = [r for r, cause in zip(line.removed_at, line.removal_causes) if cause == "median"]
    if medians:
        text += f"; the scan stops calling it massive at block {medians[0]} only because the median |a| grows there (the value holds)"
    elif line.removed_at and not set(line.removed_at) <= set(line.erased_at):
        text += f"; the scan stops calling it massive at block {line.removed_at[0]}"
    return text + "."


def _super_weight_words(steps: list[SuperWeightStep]) -> str:
    words = [f"[{s.weight.row}, {s.weight.col}] leaves {s.value_birth:+,.1f} ({'still massive' if s.still_massive else 'not massive'}, "
             f"perplexity x{s.perplexity_ratio:,.2f})" for s in steps]
    return f"Its super weights in {steps[0].weight.matrix}, zeroed one after another: " + "; then ".join(words) + "."
