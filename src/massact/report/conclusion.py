"""The conclusion: plain-language sentences built from the numbers above them in the report."""

from __future__ import annotations

from ..analysis.causal.results import SuperWeightStep
from ..analysis.detect.results import DimSummary
from ..analysis.mechanism.results import ExpertPruning, Lifeline, MoeAttribution, NormFactors, Origin, Phase, SuperExperts
from ..analysis.results import Report
from ..analysis.trigger.results import Trigger
from ..numbers import short
from .mechanism import CARRIER_VERDICTS
from .qk import qk_words

# Said in the warnings where a scan cannot verify: an encoder whose tokenizer has no mask token to score with.
NO_MASK_TOKEN = "verification skipped: the tokenizer has no mask token, so the masked-LM loss cannot be measured"


_PLACES = {
    "mlp_gate": "the gate projection (mlp_gate)",
    "mlp_up": "the up projection (mlp_up)",
    "mlp_out": "the down projection (mlp_out)",
}


def _explosion_words(name: str, gated: bool) -> str:
    if name == "mlp_act":
        return "the gated product act(gate) x up (mlp_act)" if gated else "the activation function (mlp_act)"
    return _PLACES.get(name, name)


def _expert_words(m: MoeAttribution) -> list[str]:
    out = [f"The router sends it to expert {e.expert} (router weight {e.router_weight:.3f}), which gives {e.share:.0%}." for e in m.experts]
    if m.shared_expert is not None:
        out.append(f"The shared expert gives {m.shared_expert.share:.0%}.")
    where = "the shared expert" if m.top_expert is None else f"expert {m.top_expert}"
    w = m.super_weight
    out.append(f"In {where}, neuron {m.neurons[0].neuron} gives {m.neurons[0].share:.0%} (router weight x act x weight).")
    out.append(f"Its super weight is {w.matrix}[{', '.join(map(str, w.index))}] = {w.value:+.4f}, {_rank(w.rank, w.entries)}.")
    return out


def _rank(rank: int, entries: int) -> str:
    return f"the largest of {short(entries)} weights" if rank == 1 else f"rank {rank:,} of {short(entries)} by |w|"


def _norm_words(n: NormFactors, written: str, post_ln: bool) -> list[str]:
    if post_ln:
        return [f"It exists only before the LayerNorm {n.parameter.removesuffix('.weight')}.",
                f"That norm scales it by {n.normalization:.3g} (1/std) x gain {n.gain:.3g}, to {short(n.landed, True)} in the block "
                "output."]
    factors = f"raw {short(n.raw, True)} x normalisation {n.normalization:.3g} x gain {n.gain:.4g} = {short(n.landed, True)}"
    if n.amplifier:
        return [f"The {written}'s own norm is the amplifier: {factors}.",
                f"Its gain on this dim is {n.gain_ratio:.0f}x its median gain, so the norm weight {n.parameter}[{n.dim}] = "
                f"{n.weight:+.4g} acts as a super weight."]
    return [f"The {written}'s own norm passes it on: {factors} (gain {n.gain_ratio:.1f}x its median)."]


def conclude(report: Report) -> list[str]:
    """One paragraph per massive dim, strongest first, in short sentences of one fact each (a line per kind of fact),
    built from the numbers above them in the report: the mechanism as a chain a reader can follow from the token to
    the erasure."""
    if not report.findings.dims:
        best = max(report.findings.layers, key=lambda s: s.ratio)
        top = best.top[0]
        found = [
            f"No massive activations under the criterion (|a| >= {report.findings.criterion.min_abs:g} and >= "
            f"{report.findings.criterion.min_ratio:g} x median). The largest top1/median is {best.ratio:.0f}x: dim {top.dim} "
            f"= {top.value:.1f} at block {best.layer}."
        ]
    else:
        found = [_lines(story(report, summary.dim)) for summary in sorted(report.findings.dims, key=lambda d: -abs(d.max_value))]
    if report.mechanism.super_experts is not None and report.mechanism.super_experts.found:
        found.append(" ".join(super_expert_words(report.mechanism.super_experts, report.causal.expert_pruning)))
    if report.causal.attention is not None and report.causal.attention.dependence:
        found.append(f"Attention sink: {report.causal.attention.dependence}.")
    if qk_words(report.qk):
        found.append(qk_words(report.qk))
    if report.valley is not None and report.valley.valley is not None:
        found.append(f"Compression valley: {report.valley.summary}.")
    return found


def super_expert_words(s: SuperExperts, pruning: list[ExpertPruning]) -> list[str]:
    """The super experts and what pruning them (and a random control: ``pruning``, the causal stage's) does, in short
    sentences."""
    names = ", ".join(f"expert {x.expert} of block {x.layer}" for x in s.found)
    others = sorted((v for row in s.profile for v in row if v == v), reverse=True)
    runner = others[len(s.found)] if len(others) > len(s.found) else float("nan")
    out = [f"Super expert{'s' if len(s.found) > 1 else ''}: {names} (largest |output| {short(s.found[0].max_output)}, "
           f"against {short(runner)} for the next expert)."]
    for p in pruning:
        who = "Pruning them" if p.kind == "super" else "Pruning as many random experts of the same blocks"
        ratio = f"multiplies perplexity by {p.perplexity_ratio:,.2f}, " if p.perplexity_ratio is not None else ""
        left = f"leaves dims {', '.join(map(str, p.massive_dims))} massive" if p.massive_dims else "leaves no dim massive"
        sink = ", and the attention on the sink tokens"
        decay = "" if p.sink_decay is None else (f"{sink} falls by {p.sink_decay:.0%}" if p.sink_decay >= 0.005
                                                  else f"{sink} rises by {-p.sink_decay:.0%}" if p.sink_decay <= -0.005
                                                  else f"{sink} barely changes")
        out.append(f"{who} {ratio}{left}{decay}.")
    return out


def _lines(sentences: list[tuple[str, str]]) -> str:
    """The story as one paragraph, a line per run of sentences of one kind: the birth, the precursor, the writer..."""
    lines: list[tuple[str, list[str]]] = []
    for kind, sentence in sentences:
        if lines and lines[-1][0] == kind:
            lines[-1][1].append(sentence)
        else:
            lines.append((kind, [sentence]))
    return "\n".join(" ".join(group) for _, group in lines)


def story(report: Report, dim: int) -> list[tuple[str, str]]:
    """The dim's mechanism as (kind, sentence) pairs, in reading order; kinds: birth, precursor, norm, neurons, explosion,
    super weight, experts, heads, trigger, chain, carriers, patching, fate, erasure, super weights. The terminal summary
    picks a few kinds."""
    summary = next(d for d in report.findings.dims if d.dim == dim)
    line = next((x for x in report.mechanism.lifelines if x.dim == dim), None)  # the scan makes one per dim
    if line is None:  # a streamed scan: the detection's facts alone
        return _detected_words(summary)
    if line.stream:  # hyper-connections: the origin is split through the streams' weights
        out = [("birth", s) for s in _stream_words(report, summary, line)]
    else:
        out = [("birth", s) for s in _birth_words(report, dim)]
    if line.precursor_layer is not None:
        out[1:1] = [("precursor", s) for s in _precursor_words(line)]
    out += _mechanism_words(report, dim) if not line.stream else _stream_mechanism_words(report, dim)
    trigger = next((t for t in report.trigger if t.dim == dim), None)
    if trigger is not None and trigger.chain:
        out += _trigger_words(trigger)
    out += _fate_words(summary, line)
    steps = [s for s in report.causal.super_weights if s.dim == dim]
    if steps:
        out += [("super weights", s) for s in _super_weight_words(steps)]
    return out


def _detected_words(summary: DimSummary) -> list[tuple[str, str]]:
    """What the corpus pass alone says of a dim (no lifeline: the stages after detection did not run)."""
    last, count = summary.persists[-1], len(summary.persists)
    tokens = ", ".join(repr(t) for t in summary.tokens[:3])
    return [("birth", f"Dim {summary.dim} becomes massive at block {summary.born_at} (largest |a| {short(abs(summary.max_value))}, "
                      f"on {tokens})."),
            ("fate", f"It is massive in block {last} only." if count == 1 else
             f"It is massive in {count} blocks, {summary.born_at} to {last}."),
            ("fate", "What writes it is not measured: the model was streamed, and the stages after the corpus pass do not "
                     "run on a streamed model yet.")]


def _birth_words(report: Report, dim: int) -> list[str]:
    birth = next(o for o in report.mechanism.origin if o.dim == dim and o.role == "birth")
    written = {"mlp": "MLP", "attn": "attention", "ple": "per-layer input"}[birth.writer]
    branch = {"mlp": birth.mlp, "attn": birth.attn, "ple": birth.ple}[birth.writer]
    stream = "the residual sum before the block's LayerNorm" if report.model.stream == "resid_sum" else "the block output"
    return [
        f"Dim {dim} is born in block {birth.layer}, at token {birth.position} ({birth.token!r}) of text {birth.text}.",
        f"Block {birth.layer}'s {written} writes it: {short(branch, True)} of {short(birth.resid_out, True)} in {stream}; "
        f"the block's input held {short(birth.resid_in, True)}.",
    ]


def _stream_words(report: Report, summary: DimSummary, line: Lifeline) -> list[str]:
    """Where a hyper-connection model's dim lives: the streams it is massive in, who writes it into the followed stream
    at birth and through which weight, and the mixing weights that carry it on."""
    streams = [name for name in summary.streams if name != "read"]
    read = " and in the combination the next sublayer reads" if "read" in summary.streams else ""
    out = [f"Dim {line.dim} is born in block {line.born_at}, at token {line.position} ({line.token!r}) of text {line.text}; "
           f"it is massive in stream{'s' if len(streams) != 1 else ''} {', '.join(streams) or 'none'}{read}."]
    who = {"mlp": "MLP", "attn": "attention"}
    for origin in (o for o in report.mechanism.streams if o.dim == line.dim):
        term = next(t for t in origin.terms if t.source == origin.carrier)
        if origin.carrier in who:
            head = f"; head {origin.heads[0].head} gives {origin.heads[0].share:.0%} of the attention output" if origin.heads else ""
            out.append(f"Block {origin.layer}'s {who[origin.carrier]} writes it into stream {origin.stream} with weight "
                       f"{term.weight:.3g}: {short(term.value, True)} of {short(origin.value, True)}{head}.")
        else:
            moved = "" if origin.role == "carry" else f", moved in from stream {origin.carrier}"
            out.append(f"Block {origin.layer}'s stream mixing carries it in stream {origin.stream} with weight {term.weight:.3g}"
                       f"{moved}: {short(term.value, True)} of {short(origin.value, True)}.")
    return out


def _stream_mechanism_words(report: Report, dim: int) -> list[tuple[str, str]]:
    """With hyper-connections: who inside the MLP that writes the stream at birth makes its output (the neurons and
    the super weight, or the experts), and the write weight that lands that output in the stream."""
    attribution = next((a for a in report.mechanism.attribution if a.dim == dim and a.role == "birth"), None)
    expert = next((e for e in report.mechanism.experts if e.dim == dim and e.role == "birth"), None)
    if attribution is not None:
        top, weight, count = attribution.neurons[0], attribution.super_weight, attribution.neurons_for_90pct
        out = [("neurons", f"Neuron {top.neuron} alone gives {top.share:.0%} of the MLP output; {count} "
                           f"neuron{'s give' if count != 1 else ' gives'} 90%."),
               ("super weight", f"Its super weight is {weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f}, "
                                f"{_rank(weight.rank, weight.entries)}.")]
        output, write, landed, stream = attribution.output, attribution.write, attribution.landed, attribution.stream
    elif expert is not None:
        out = [("experts", s) for s in _expert_words(expert.moe)]
        output, write, landed, stream = expert.moe.actual, expert.write, expert.landed, expert.stream
    else:
        return []
    out.append(("write weight", f"The MLP's write weight {write:.3g} lands its output {short(output, True)} as "
                                f"{short(landed, True)} in stream {stream}."))
    return out


def _mechanism_words(report: Report, dim: int) -> list[tuple[str, str]]:
    """Who inside the writing sublayer makes it: the norm, the neurons and the super weight, the experts, or the heads."""
    birth = next(o for o in report.mechanism.origin if o.dim == dim and o.role == "birth")
    written = {"mlp": "MLP", "attn": "attention", "ple": "per-layer input"}[birth.writer]
    out = [("norm", s) for s in _norm_words(birth.norm, written, report.model.stream == "resid_sum")] if birth.norm is not None else []
    attribution = next((a for a in report.mechanism.attribution if a.dim == dim and a.role == "birth"), None)
    anatomy = next((a for a in report.mechanism.anatomy if a.dim == dim and a.role == "birth"), None)
    routed = next((e for e in report.mechanism.experts if e.dim == dim and e.role == "birth"), None)
    if birth.mlp_dense is not None and birth.writer == "mlp":
        out += [("norm", s) for s in _beside_words(birth, attribution.norm if attribution else routed.norm if routed else None,
                                                    "dense MLP's" if attribution else "routed experts'")]
    if attribution and anatomy:
        top, weight, count = attribution.neurons[0], attribution.super_weight, attribution.neurons_for_90pct
        of = " of the raw MLP output" if attribution.landed is not None else ""
        out += [
            ("neurons", f"Neuron {top.neuron} alone gives {top.share:.0%}{of}; {count} neuron{'s give' if count != 1 else ' gives'} 90%."),
            ("explosion", f"The jump happens at {_explosion_words(anatomy.explosion_point, report.model.gated)}."),
            ("super weight", f"Its super weight is {weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f}, "
                             f"{_rank(weight.rank, weight.entries)}."),
        ]
    elif routed is not None:
        out += [("experts", s) for s in _expert_words(routed.moe)]
    elif birth.heads:
        out.append(("heads", f"Head {birth.heads[0].head} gives {birth.heads[0].share:.0%} of the attention output."))
    return out


def _beside_words(birth: Origin, own: NormFactors | None, whose: str) -> list[str]:
    """Experts beside the dense MLP: the two parts of the branch norm's input, and the writing part's own norm (``own``,
    ``whose``: the writing part's name, possessive)."""
    out = [f"The norm's input {short(birth.mlp_raw, True)} is the dense MLP's part {short(birth.mlp_dense, True)} plus the routed "
           f"experts' {short(birth.mlp_routed, True)}, each after its own norm."]
    if own is not None:
        out.append(f"The {whose} own norm {own.parameter.removesuffix('.weight')}: raw {short(own.raw, True)} x normalisation "
                   f"{own.normalization:.3g} x gain {own.gain:.4g} = {short(own.landed, True)}.")
    return out


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _phase_words(phase: Phase) -> str:
    who = {"mlp": "MLP", "attn": "attention", "norm": "norm", "ple": "per-layer input", "scale": "layer scalar",
           "mix": "stream mixing"}[phase.writer]
    return f"{_blocks(phase.first, phase.last)}'s {who} ({short(phase.value_before, True)} -> {short(phase.value_after, True)})"


def _precursor_words(line: Lifeline) -> list[str]:
    """The smaller value the same dim and token carried first, who wrote it and who erased it."""
    writes = [p for p in line.phases if p.name == "precursor"]
    erases = [p for p in line.phases if p.name == "precursor erasure"]
    sign = "" if (line.precursor >= 0) == (line.sign >= 0) else " of the opposite sign"
    out = [f"Before that, a precursor{sign} of {short(line.precursor, True)} is written by " + ", ".join(map(_phase_words, writes)) + "."]
    if erases:
        out.append("The precursor is erased by " + ", ".join(map(_phase_words, erases)) + ".")
    return out


def _trigger_words(trigger: Trigger) -> list[tuple[str, str]]:
    first, rest = trigger.chain[0], trigger.chain[1:]
    if first.kind != "neuron":
        return []
    name = lambda link: "gate" if link.site == "mlp_gate" else "pre-activation"
    of = f" of expert {first.expert}" if first.expert is not None else ""
    out = [("trigger",
            f"Neuron {first.index}{of} fires at token {trigger.position} because its {name(first)} is {short(first.value, True)} "
            f"there, against {short(first.value_others, True)} on average at the other tokens.")]
    if trigger.router is not None:
        r = trigger.router
        out.append(("trigger", f"The router picks expert {r.expert} there with a logit of {short(r.logit, True)}, against "
                               f"{short(r.others_mean, True)} on average at the other tokens."))
    previous = first
    for link in rest:
        step = (f"Of that {name(previous)}, {link.source} gives {short(link.source_here, True)} there "
                f"({short(link.source_others, True)} elsewhere)")
        previous = link
        if link.kind == "neuron":
            step += (f", {short(link.feeds, True)} through neuron {link.index}, whose {name(link)} is {short(link.value, True)} there "
                     f"({short(link.value_others, True)} elsewhere)")
        elif link.kind == "head" and link.attends:
            step += (f", {short(link.feeds, True)} through head {link.index}, which attends to {link.attends[0][1]!r} "
                     f"({link.attends[0][2]:.0%})")
        elif link.kind != "mlp":
            step += ", straight from the token"
        out.append(("chain", step + "."))
    if trigger.carriers is not None:
        out.append(("carriers", f"It is {CARRIER_VERDICTS[trigger.carriers.verdict].split(':')[0]}."))
    patch = next((p for p in trigger.patching if p.replacement != "zero"), None)
    if patch is not None:
        out.append(("patching", f"Replacing {patch.source}'s output there by its mean over the other tokens changes the {name(first)} "
                                f"by {short(patch.total, True)} ({short(patch.direct, True)} directly) and leaves "
                                f"{short(patch.value_birth, True)} at the birth block "
                                f"({'still massive' if patch.still_massive else 'not massive'})."))
    return out


def _fate_words(summary: DimSummary, line: Lifeline) -> list[tuple[str, str]]:
    last, count = summary.persists[-1], len(summary.persists)
    out = [("fate",
            f"It is massive in block {last} only." if count == 1 else f"It is massive in {count} blocks, {summary.born_at} to {last}.")]
    growth = [p for p in line.phases if p.name == "growth"]
    if growth:
        out.append(("fate", "It grows in " + ", ".join(map(_phase_words, growth)) + "."))
    erasure = [p for p in line.phases if p.name == "erasure"]
    reversals = [p for p in line.phases if p.name == "reversal"]
    if erasure or not reversals:
        out.append(("erasure", ("It is erased by " + ", ".join(map(_phase_words, erasure)) + ".") if erasure else "It is never erased."))
    for layer in _overshoots(line):
        out.append(("erasure", f"Block {layer} overshoots: it takes the value through zero, to {short(line.steps[layer].value, True)} "
                               "(not massive there)."))
    for phase in reversals:
        out.append(("erasure", f"At block {phase.first} it is massive again with the other sign: {_phase_words(phase)}."))
    medians = [r for r, cause in zip(line.removed_at, line.removal_causes) if cause == "median"]
    if medians:
        out.append(("erasure", f"The scan stops calling it massive at block {medians[0]} only because the median |a| grows there; "
                               "the value holds."))
    elif line.removed_at and not set(line.removed_at) <= set(line.erased_at):
        out.append(("erasure", f"The scan stops calling it massive at block {line.removed_at[0]}."))
    return out


def _overshoots(line: Lifeline) -> list[int]:
    """The erasing blocks that take the value through zero (it leaves them with the other sign, not massive)."""
    return [step.layer for step in line.steps if step.phase == "erasure" and step.layer
            and step.value * line.steps[step.layer - 1].value < 0]


def _super_weight_words(steps: list[SuperWeightStep]) -> list[str]:
    out = []
    for s in steps:
        at = f"[{s.weight.row}, {s.weight.col}]"
        which = f"its super weight {s.weight.matrix}{at}" if s.step == 1 else f"{at} as well"
        cost = f"; perplexity x{s.perplexity_ratio:,.2f}" if s.perplexity_ratio is not None else ""
        state = "still massive" if s.still_massive else "not massive"
        out.append(f"Zeroing {which} leaves {short(s.value_birth, True)} at birth ({state}{cost}).")
    return out
