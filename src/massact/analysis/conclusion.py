"""The conclusion: plain-language sentences built from the numbers above them in the report."""

from __future__ import annotations

from .moe import MoeAttribution
from .results import NormFactors, Origin, Report


_PLACES = {
    "mlp_gate": "the gate projection (mlp_gate)",
    "mlp_up": "the up projection (mlp_up)",
    "mlp_out": "the down projection (mlp_out)",
}


def _explosion_words(name: str, gated: bool) -> str:
    if name == "mlp_act":
        return "the gated product act(gate) x up (mlp_act)" if gated else "the activation function (mlp_act)"
    return _PLACES.get(name, name)


def _removal_words(o: Origin) -> str:
    if o.cause == "median":
        return f"falls under the ratio at block {o.layer} because the median |a| grows (the value holds: {o.resid_in:+.1f} -> {o.resid_out:+.1f})"
    return f"is removed by block {o.layer}'s {'MLP' if o.writer == 'mlp' else 'attention'} ({o.resid_in:+.1f} -> {o.resid_out:+.1f})"


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
    """Plain-language sentences, one per massive dim, built from the numbers above them in the report."""
    if not report.dims:
        best = max(report.layers, key=lambda s: s.ratio)
        top = best.top[0]
        return [
            f"No massive activations under the criterion (|a| >= {report.criterion.min_abs:g} and >= "
            f"{report.criterion.min_ratio:g} x median): the largest top1/median is {best.ratio:.0f}x, dim {top.dim} "
            f"= {top.value:.1f} at block {best.layer}."
        ]
    sentences = []
    gated = report.model.gated
    for summary in sorted(report.dims, key=lambda d: -abs(d.max_value)):
        birth = next(o for o in report.origin if o.dim == summary.dim and o.role == "birth")
        written = {"mlp": "MLP", "attn": "attention"}[birth.writer]
        branch = birth.mlp if birth.writer == "mlp" else birth.attn
        stream = "the residual sum before the block's LayerNorm" if report.model.stream == "resid_sum" else "resid_out"
        text = (
            f"dim {summary.dim} at token {birth.position} ({birth.token!r}) is born in block {birth.layer}, written by its "
            f"{written} ({branch:+.1f} of {stream} {birth.resid_out:+.1f}, resid_in was {birth.resid_in:+.1f})"
        )
        if birth.norm is not None:
            text += "; " + _norm_words(birth.norm, written, report.model.stream == "resid_sum")
        attribution = next((a for a in report.attribution if a.dim == summary.dim and a.role == "birth"), None)
        anatomy = next((a for a in report.anatomy if a.dim == summary.dim and a.role == "birth"), None)
        if attribution and anatomy:
            top = attribution.neurons[0]
            weight = attribution.super_weight
            count = attribution.neurons_for_90pct
            raw = " of the raw MLP output" if attribution.landed is not None else " of it"
            text += (
                f"; {count} neuron{'s' if count != 1 else ''} give 90%{raw}, neuron {top.neuron} alone "
                f"{top.share:.1%}; the explosion is at {_explosion_words(anatomy.explosion_point, gated)}; "
                f"super weight {weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f}, "
                f"rank {weight.rank} of {weight.entries:,} entries by |w|"
            )
        elif split := next((e.moe for e in report.experts if e.dim == summary.dim and e.role == "birth"), None):
            text += "; " + _expert_words(split)
        elif birth.heads:
            head = birth.heads[0]
            text += f"; head {head.head} gives {head.share:.1%} of the attention output"
        last = summary.persists[-1]
        count = len(summary.persists)
        text += f". It is massive in block {last}" if count == 1 else f". It is massive in {count} blocks, {summary.born_at} to {last}"
        removals = [o for o in report.origin if o.dim == summary.dim and o.role == "removal"]
        if removals:
            text += ", and " + ", ".join(_removal_words(o) for o in removals)
        else:
            text += ", and is still massive at the last block"
        sentences.append(text + ".")
    return sentences
