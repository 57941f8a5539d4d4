"""The report's mechanism sections: each dim's lifeline, the blocks it names, the trigger and the super weights."""

from __future__ import annotations

from rich.text import Text

from ..analysis.mechanism.results import Anatomy, Attribution, ExpertPruning, Lifeline, SuperExperts
from ..analysis.results import Report
from ..analysis.trigger.results import ChainLink, RouterTrigger, Trigger
from .tables import Style, add_row, num, ratio, spans, where

SHOWN_SOURCES = 8  # sources listed per pre-activation; report.json has all of them
_WRITERS = {"attn": "attention", "mlp": "MLP", "norm": "norm", "ple": "per-layer input", "scale": "layer scalar",
            "mix": "stream mixing", "": ""}


def phase_words(line: Lifeline) -> list[str]:
    """One line per phase: its blocks, the sublayer responsible, and what it does to the value."""
    lines = []
    for p in line.phases:
        blocks = f"block {p.first}" if p.first == p.last else f"blocks {p.first}-{p.last}"
        who = f", {_WRITERS[p.writer]}" if p.writer else ""
        lines.append(f"  {p.name}: {blocks}{who}, {num(p.change, True)} ({num(p.value_before, True)} -> {num(p.value_after, True)})")
    return lines


def removal_words(line: Lifeline) -> str:
    """Where the scan stops calling the dim massive against where its value is really erased."""
    erased = f"erased at block{'s' if len(line.erased_at) != 1 else ''} {spans(line.erased_at)}" if line.erased_at else "never erased"
    if not line.removed_at:
        return f"The scan calls it massive to the last block; its value is {erased}."
    parts = []
    for removed, cause in zip(line.removed_at, line.removal_causes):
        why = "the median |a| grew past it while the value held" if cause == "median" else "its value fell"
        parts.append(f"block {removed} ({why})")
    same = set(line.removed_at) <= set(line.erased_at)
    return (f"The scan stops calling it massive at {', '.join(parts)}; its value is {erased}"
            + ("." if same else ": the two differ, and the erasure is where the value really goes."))


def lifeline_tables(style: Style, report: Report) -> list:
    out: list = []
    post_ln = report.model.stream == "resid_sum"
    for line in report.mechanism.lifelines:
        columns = ["block", "resid_in", "attn", *(["norm"] if post_ln else []), "mlp", "value", "change", "by", "median |a|", "massive",
                   "phase"]
        text = {columns.index(c) for c in ("by", "massive", "phase")}
        table = style.table(None, *columns, right=tuple(i for i in range(len(columns)) if i not in text))
        for step in line.steps:
            norm = [num(step.norm, True)] if post_ln else []
            by = _WRITERS[step.writer] if step.phase not in ("", "hold", "after") else ""
            add_row(table, str(step.layer), num(step.resid_in, True), num(step.attn, True), *norm, num(step.mlp, True),
                    num(step.value, True), num(step.change, True), by, num(step.median), "yes" if step.massive else "", step.phase)
        out += [Text(f"dim {line.dim} at {where(line.text, line.position, line.token)}: value = resid_in + "
                     f"attn{' + norm' if post_ln else ''} + mlp, as they land (embedding {num(line.embedding, True)}; largest gap "
                     f"of the terms to the value {line.error:.1e})"),
                table,
                Text("\n".join([f"Phases of dim {line.dim} (peak {num(line.peak, True)} at block {line.peak_layer}):", *phase_words(line),
                                removal_words(line)]) + "\n")]
    return out


def anatomy_summary(style: Style, groups: list[list[Anatomy]]) -> list:
    """One row per other block the lifeline names: where its MLP explodes and which neuron leads there."""
    if not groups:
        return []
    table = style.table("The other writing and erasing blocks (full checkpoints in report.json)", "block", "role", "dims", "where",
                        "explosion point", "top neuron at mlp_act", "its |act|", "top1/median at mlp_act", right=(0, 6, 7))
    for group in sorted(groups, key=lambda g: (g[0].layer, g[0].role)):
        a = group[0]
        act = next(c for c in a.checkpoints if c.name == "mlp_act")
        add_row(table, str(a.layer), a.role, ", ".join(str(x.dim) for x in group), where(a.text, a.position, a.token), a.explosion_point,
                str(act.argmax), num(act.max), ratio(act.ratio))
    return [table]


def attribution_summary(style: Style, attributions: list[Attribution]) -> list:
    """One row per other block the lifeline names: its MLP output into the dim and the neurons that make it."""
    if not attributions:
        return []
    table = style.table("The other writing and erasing blocks (every neuron in report.json)", "block", "role", "dim", "mlp_out[dim]",
                        "neurons for 90%", "top neurons (share)", "super weight", "rank", right=(0, 2, 3, 4, 7))
    for a in sorted(attributions, key=lambda a: (a.dim, a.layer)):
        top = ", ".join(f"{n.neuron} ({n.share:.0%})" for n in a.neurons[:3])
        w = a.super_weight
        add_row(table, str(a.layer), a.role, str(a.dim), num(a.output, True), str(a.neurons_for_90pct), top,
                f"[{w.row}, {w.col}] = {w.value:+.3f}", f"{w.rank:,}")
    return [table]


def chain_words(chain: list[ChainLink], dim: int) -> list[str]:
    """The chain, from the massive value back toward the token, one link a line."""
    lines, previous = [], None
    for link in chain:
        site = {"mlp_gate": "gate", "mlp_up": "pre-activation"}.get(link.site or "", link.site)
        before, previous = previous, site
        if link.depth == 0 and link.kind == "neuron":
            expert = "shared expert " if link.shared else f"expert {link.expert} " if link.expert is not None else ""
            lines.append(f"  block {link.layer} {expert}neuron {link.index} writes dim {dim}; its {site} is {num(link.value, True)} here, "
                         f"{num(link.value_others, True)} on average at the other positions")
            continue
        if link.depth == 0:  # attention writes the value
            lines.append(f"  block {link.layer} head {link.index} writes dim {dim} ({num(link.feeds, True)})" + _attends(link))
            continue
        feeds = f"  <- {link.source} gives {num(link.source_here, True)} of that {before} here ({num(link.source_others, True)} elsewhere)"
        if link.kind == "neuron":
            lines.append(f"{feeds}, {num(link.feeds, True)} through neuron {link.index}, whose {site} is {num(link.value, True)} here "
                         f"({num(link.value_others, True)} elsewhere)")
        elif link.kind == "head":
            lines.append(f"{feeds}, {num(link.feeds, True)} through head {link.index}" + _attends(link))
        elif link.kind == "mlp":
            lines.append(f"{feeds} (a mixture of experts: not split further)")
        else:
            lines.append(f"{feeds}: the chain reaches the token itself")
    return lines


def router_words(r: RouterTrigger) -> str:
    """Why the router sends the massive token to the writing expert, in one sentence."""
    return (f"Block {r.layer}'s router sends the token to expert {r.expert}: its logit is {num(r.logit, True)} there against "
            f"{num(r.others_mean, True)} on average at the other tokens (largest {num(r.others_max, True)}), rank {r.rank} of the "
            f"experts; it also sends {r.others_routed:.0%} of the other tokens there")


CARRIER_VERDICTS = {"position": "the position, not the token", "token": "the token, not the position",
                    "both": "the token and the position both carry it",
                    "context": "neither the token nor the position alone: it depends on the text"}


def carrier_words(t: Trigger) -> str:
    """The token-or-position verdict for ``t``'s dim, the two probes behind it and where the scan saw the dim."""
    c = t.carriers
    probes = (f"at block {c.probe_layer}, with {c.swapped_token!r} put at position {t.position} it carries {c.swapped:+,.1f} there "
              f"({'massive' if c.swapped_massive else 'not massive'}), and {t.token!r} moved to position {t.position + 1} "
              f"carries {c.moved:+,.1f} ({'massive' if c.moved_massive else 'not massive'})")
    distinct = len(c.first_tokens)
    seen = (f"the scan saw it at the first position of {c.first_position_texts} of {c.texts} texts "
            f"({distinct} different first token{'s' if distinct != 1 else ''})")
    later = ", ".join(f"{token!r} x{count}" for token, count in c.other_positions[:4])
    seen += f" and at later positions ({later})" if later else " and at no later position"
    return f"{CARRIER_VERDICTS[c.verdict]}: {probes}; {seen}"


def _attends(link: ChainLink) -> str:
    if not link.attends:
        return ""
    return ", which attends to " + ", ".join(f"pos {p} {t!r} ({w:.0%})" for p, t, w in link.attends)


def trigger_tables(style: Style, report: Report) -> list:
    out: list = []
    shown: dict[tuple, list[int]] = {}  # dims written by the same neurons at the same place share one set of tables
    for t in report.trigger:
        key = (t.text, t.position, tuple((n.layer, n.neuron) for n in t.neurons))
        shown.setdefault(key, []).append(t.dim)
    done: set[tuple] = set()
    for t in report.trigger:
        key = (t.text, t.position, tuple((n.layer, n.neuron) for n in t.neurons))
        if key not in done:
            done.add(key)
            out += _split_tables(style, t, shown[key])
        out.append(Text("\n".join([f"Chain for dim {t.dim}, from the massive value back toward the token:", *chain_words(t.chain, t.dim)])))
        if t.router is not None:
            out.append(Text(router_words(t.router) + "."))
        if t.carriers is not None:
            out.append(Text(f"Token or position for dim {t.dim}: {carrier_words(t)}."))
        if t.patching:
            out += _patch_table(style, t)
        out += [Text(f"- {w}") for w in t.warnings]
    return out


def _split_tables(style: Style, t: Trigger, dims: list[int]) -> list:
    out: list = []
    for n in t.neurons:
        for s in n.splits:
            name = {"mlp_gate": "gate", "mlp_up": "up" if len(n.splits) > 1 else "pre-activation"}[s.site]
            expert = " shared expert" if n.shared else f" expert {n.expert}" if n.expert is not None else ""
            out.append(Text(
                f"Block {n.layer}{expert} neuron {n.neuron} {name} ({n.role} of dim{'s' if len(dims) > 1 else ''} "
                f"{', '.join(map(str, dims))}) at "
                f"{where(t.text, t.position, t.token)}: {num(s.value, True)} here, {num(s.others_mean, True)} on average at the other "
                f"positions (largest {num(s.others_max, True)}); input norm factor {s.scale:.4g} here, {s.scale_others:.4g} elsewhere"))
            table = style.table(None, "source", "here", "other positions: mean", "max", "here - mean", right=(1, 2, 3, 4))
            for p in s.sources[:SHOWN_SOURCES]:
                add_row(table, p.source, num(p.here, True), num(p.others_mean, True), num(p.others_max, True), num(p.difference, True))
            rest = s.sources[SHOWN_SOURCES:]
            if rest:
                add_row(table, f"{len(rest)} other sources", num(sum(p.here for p in rest), True),
                        num(sum(p.others_mean for p in rest), True), "", num(sum(p.difference for p in rest), True))
            add_row(table, f"sum (the {name}; gap {s.error:.1e})", num(sum(p.here for p in s.sources), True),
                    num(sum(p.others_mean for p in s.sources), True), "", num(sum(p.difference for p in s.sources), True))
            out.append(table)
    return out


def _patch_table(style: Style, t: Trigger) -> list:
    first = t.chain[0]
    head = Text(
        f"Patching the top sources of block {first.layer} neuron {first.index}'s "
        f"{'gate' if first.site == 'mlp_gate' else 'pre-activation'} at "
        f"{where(t.text, t.position, t.token)}: the change of the neuron's value directly through the source (norms held) and in total "
        "(what the model shows, through every block in between)")
    table = style.table(None, "source", "replaced by", "direct", "total", "neuron now", f"dim {t.dim} at birth", "at peak", "still massive",
                        right=(2, 3, 4, 5, 6))
    for p in t.patching:
        add_row(table, p.source, p.replacement, num(p.direct, True), num(p.total, True), num(p.pre_activation, True),
                num(p.value_birth, True), num(p.value_peak, True), "yes" if p.still_massive else "no")
    return [head, table]


def super_weight_tables(style: Style, report: Report) -> list:
    matrices = ", ".join(dict.fromkeys(s.weight.matrix for s in report.causal.super_weights))
    head = Text(f"Each step zeroes the weight of the top contributor of what is left at the dim's birth block and main carrier, keeping "
                f"the earlier ones zeroed; weights as stored in {matrices}, ranked by |w| in the unmodified matrix.")
    table = style.table(None, "dim", "step", "weight [row, col]", "value", "rank", "neuron", "left at birth", "at peak", "massive",
                        "perplexity", "x baseline", right=(0, 1, 3, 4, 5, 6, 7, 9, 10))
    for s in report.causal.super_weights:
        w = s.weight
        add_row(table, str(s.dim), str(s.step), f"[{w.row}, {w.col}]", f"{w.value:+.4f}", f"{w.rank:,}", str(s.neuron),
                num(s.value_birth, True), num(s.value_peak, True), "yes" if s.still_massive else "no",
                num(s.perplexity) if s.perplexity is not None else "-",
                f"{s.perplexity_ratio:,.2f}" if s.perplexity_ratio is not None else "-")
    return [head, table]


def super_expert_tables(style: Style, s: SuperExperts, pruning: list[ExpertPruning]) -> list:
    """The super experts by the rule, each block's largest expert maxima, and what pruning them does (``pruning``:
    the causal stage's rows)."""
    r = s.rule
    out: list = [Text(
        f"Super experts (Su et al. 2025): an expert whose largest |output| over the corpus (before its router weight) is above the "
        f"{r.quantile:.1%} quantile of every (block, expert) maximum and above {r.fraction:g} x the largest (together: "
        f"{num(r.threshold)}), in blocks 0-{r.last_block}. Found: "
        + (", ".join(f"expert {x.expert} of block {x.layer} ({num(x.max_output)})" for x in s.found) or "none") + ".")]
    table = style.table("Per block: its largest expert maxima (every one in report.json: super_experts.profile)", "block",
                        "largest experts (max |output|)", "median expert", "shared expert", right=(0, 2, 3))
    for layer, row in enumerate(s.profile):
        seen = sorted(((v, e) for e, v in enumerate(row) if v == v), reverse=True)
        if not seen:
            continue
        shared = s.shared[layer]
        add_row(table, str(layer), ", ".join(f"{e}: {num(v)}" for v, e in seen[:3]), num(seen[len(seen) // 2][0]),
                num(shared) if shared == shared else "-")
    out.append(table)
    if pruning:
        table = style.table("Pruned: the router never selects them (a softmax renormalises over the rest)", "pruned", "experts",
                            "perplexity", "x baseline", "massive dims left", "sink decay", right=(2, 3, 5))
        for p in pruning:
            add_row(table, "super experts" if p.kind == "super" else "as many random experts",
                    ", ".join(f"{layer}:{e}" for layer, e in p.pruned),
                    num(p.perplexity) if p.perplexity is not None else "-",
                    f"{p.perplexity_ratio:,.2f}" if p.perplexity_ratio is not None else "-",
                    ", ".join(map(str, p.massive_dims)) or "none", f"{p.sink_decay:.0%}" if p.sink_decay is not None else "-")
        out.append(table)
    return out
