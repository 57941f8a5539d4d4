"""The report for people: rich tables in the terminal, the same tables as plain Markdown-style text in report.txt."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..analysis.deploy.results import Precision, Quantization
from ..analysis.mechanism.results import Anatomy, Attribution, ExpertAttribution, HeadShare
from ..analysis.results import Report
from .mechanism import anatomy_summary, attribution_summary, lifeline_tables, super_expert_tables, super_weight_tables, trigger_tables
from .qk import qk_tables
from .sections import SECTIONS, section
from .tables import Style, add_row, num, plain_text, ratio, spans, where

MASSIVE_ROWS = 40  # the full list is in report.json


_STREAMS = {
    "resid_out": "each block's output (resid_out; block i = HF hidden_states[i+1], before any final norm)",
    "resid_sum": "each block's residual sum before its last LayerNorm (resid_sum; post-LN blocks norm it away)",
}


def renderables(report: Report, plain: bool) -> list:
    """Every section of the report, in reading order, numbered by report/sections.py."""
    style = Style(plain)
    out: list = header(report, plain)
    for part in SECTIONS:
        out += section_renderables(report, part.key, style)
    if report.warnings:
        out += section_renderables(report, "warnings", style)
    return out + section_renderables(report, "conclusion", style)


def header(report: Report, plain: bool) -> list:
    """The model, the corpus and the criterion: the lines above the first section."""
    m, c = report.model, report.findings.criterion
    return [
        Text(f"massact report: {m.name}", style="" if plain else "bold"),
        Text(
            f"{m.architecture} ({m.family} adapter), {m.n_layers} blocks, d_model {m.d_model}, d_mlp {m.d_mlp}, "
            f"{m.n_heads} heads, {'gated' if m.gated else 'plain'} MLP, {m.dtype} on {m.device}\n"
            f"Measured in: {_STREAMS[m.stream]}.{' Blocks: ' + m.notes + '.' if m.notes else ''}\n"
            + (f"Adapter inferred from the model's modules; checks passed on a padded probe batch: {'; '.join(m.inferred)}.\n"
               if m.inferred else "")
            + f"{report.corpus.texts} text(s) from {report.corpus.source}: {report.corpus.windows} forward pass(es), "
            f"{report.corpus.tokens} tokens. Massive: |a| >= {c.min_abs:g} "
            f"and |a| >= {c.min_ratio:g} x the {c.median} (sketch error under {c.median_rel_error:.2%})."
        ),
    ]


def section_renderables(report: Report, key: str, style: Style) -> list:
    """One section: its numbered heading and its tables, or one line saying why the run left it empty."""
    part = section(key)
    body = _BODIES[key](style, report)
    if not body:
        body = [Text(_why_empty(report, key))]
    return [style.heading(part.heading if part in SECTIONS else part.title), *body]


def _why_empty(report: Report, key: str) -> str:
    if key == "valley":  # measured with or without a massive activation: only a report from before it lacks it
        return "Not in this report: it was written by a massact that did not measure the compression valley; scan again."
    if not report.findings.dims:
        return "Nothing massive under the criterion: nothing to trace."
    if key in ("verification", "sinks") or (key == "super-weights" and report.causal.verification is None):
        return (report.causal.default + "." if report.causal.default else
                "Not run: pass --verify (on by default where the interventions' estimated time fits), or run `massact verify DIR`.")
    if key == "quantization":
        return "Not run: pass --quant, or run `massact quant DIR` on this report."
    return {
        "anatomy": "No MLP writes a massive value: no MLP to open.",
        "attribution": "No MLP writes a massive value: no neuron to attribute.",
        "trigger": "No neuron writes a massive value: no trigger to follow.",
        "super-weights": "No super weight found to zero.",
    }.get(key, "Nothing to show.")


def _anatomy_body(style: Style, report: Report) -> list:
    out: list = []
    places: dict[tuple[int, int, int, str], list[Anatomy]] = {}
    for anatomy in report.mechanism.anatomy:  # dims written at one place share the MLP's checkpoints: show them once
        places.setdefault((anatomy.layer, anatomy.text, anatomy.position, anatomy.role), []).append(anatomy)
    groups = list(places.values())
    for group in (g for g in groups if g[0].role == "birth"):
        out += _anatomy_tables(style, group[0], report.model.gated, [a.dim for a in group])
    return out + anatomy_summary(style, [g for g in groups if g[0].role != "birth"])


def _attribution_body(style: Style, report: Report) -> list:
    out: list = []
    shown: set[int] = set()
    for attribution in (a for a in report.mechanism.attribution if a.role == "birth"):
        out += _attribution_tables(style, attribution, attribution.layer not in shown)
        shown.add(attribution.layer)
    out += attribution_summary(style, [a for a in report.mechanism.attribution if a.role != "birth"])
    if report.mechanism.experts:
        out.append(Text("Expert and neuron attribution (a mixture of experts): the experts first, then the neurons of the strongest one."))
        for split in report.mechanism.experts:
            out += _expert_tables(style, split)
    if report.mechanism.super_experts is not None:
        out += super_expert_tables(style, report.mechanism.super_experts, report.causal.expert_pruning)
    return out


def _layer_table(style: Style, report: Report) -> Table:
    massive_layers = {m.layer for m in report.findings.massive}
    kinds = report.model.blocks  # where the blocks differ: each one's mixer, attention kind, positions
    table = style.table(None, "block", *(["kind"] if kinds else []), "median |a|", "top1", "top1/median", "top1 at", "top2", "top3",
                        "massive", right=(0, *(i + bool(kinds) for i in (1, 2, 3, 5, 6))))
    for stats in report.findings.layers:
        top = stats.top
        cell = [f"{num(e.value, True)} d{e.dim}{_stream(e.stream, '.')}" for e in top[1:3]] + ["-", "-"]
        add_row(
            table,
            str(stats.layer),
            *([kinds[stats.layer]] if kinds else []),
            num(stats.median),
            num(top[0].value, True) if top else "-",
            ratio(stats.ratio),
            f"dim {top[0].dim}{_stream(top[0].stream)}, {where(top[0].text, top[0].position, top[0].token)}" if top else "-",
            cell[0],
            cell[1],
            "yes" if stats.layer in massive_layers else "",
        )
    return table


def _massive_tables(style: Style, report: Report) -> list:
    if not report.findings.massive:
        return [Text("None found under the criterion.")]
    dims = style.table("By dim", "dim", "born at block", "massive in blocks", "removed at block", "largest value", "tokens",
                       right=(0, 1, 4))
    for d in report.findings.dims:
        add_row(dims, f"{d.dim}{_stream(', '.join(d.streams))}", str(d.born_at), spans(d.persists), spans(d.removed_at),
                num(d.max_value, True),
                ", ".join(repr(t) for t in d.tokens[:6]))
    groups: dict[tuple[int, int, int], list] = {}
    for e in report.findings.massive:
        groups.setdefault((e.dim, e.text, e.position), []).append(e)
    entries = style.table(
        f"Where they sit ({len(report.findings.massive)} entries, all in report.json)",
        "dim", "text", "pos", "token", "blocks", "largest value", "x median", right=(0, 1, 2, 5, 6),
    )
    for (dim, text, position), group in list(groups.items())[:MASSIVE_ROWS]:
        top = max(group, key=lambda e: abs(e.value))
        add_row(entries, f"{dim}{_stream(top.stream)}", str(text), str(position), repr(top.token), spans(sorted({e.layer for e in group})),
                num(top.value, True), ratio(top.ratio))
    rest = len(groups) - MASSIVE_ROWS
    return [dims, entries] + ([Text(f"... and {rest} more places in report.json")] if rest > 0 else [])


def _stream(name: str, joint: str = " ") -> str:
    """A hyper-connection stream's label after a dim ("dim 20 (s2)", "d20.s2"); nothing where the state is one stream."""
    if not name:
        return ""
    return f".{name}" if joint == "." else f" ({name})"


def _stream_origin_table(style: Style, report: Report) -> Table:
    """Each stream origin: the stream's value split into what the mixing carries from each input stream and what
    each sublayer writes through its weight (``massact.analysis.mechanism.streams``)."""
    table = style.table(
        "stream = sum_i mix[i, stream] x input stream i + attn x its weight + mlp x its weight, at the coordinate",
        "dim", "block", "stream", "where", "value", "carried (weight)", "attn (weight)", "mlp (weight)", "carrier", "role",
        right=(0, 1, 4),
    )
    for o in report.mechanism.streams:
        terms = {t.source: t for t in o.terms}
        carried = [t for t in o.terms if t.source not in ("attn", "mlp")]
        main = max(carried, key=lambda t: abs(t.value))
        add_row(table, str(o.dim), str(o.layer), o.stream, where(o.text, o.position, report.findings.tokens[o.text][o.position]),
                num(o.value, True), f"{num(sum(t.value for t in carried), True)} ({main.source} x {main.weight:.3g})",
                *(f"{num(terms[part].value, True)} (x {terms[part].weight:.3g})" for part in ("attn", "mlp")), o.carrier, o.role)
    return table


def _origin_tables(style: Style, report: Report) -> list:
    if report.mechanism.streams:
        return [_stream_origin_table(style, report), *(_heads_table(style, o.layer, o.dim, o.heads, o.stream)
                                                      for o in report.mechanism.streams if o.heads)]
    if not report.mechanism.origin:
        return [Text("Nothing to trace.")]
    post_ln = report.model.stream == "resid_sum"
    ple = any(o.ple is not None for o in report.mechanism.origin)  # a per-layer input writes too (Gemma-4)
    lacking = "; -: the block has no such branch" if any(None in (o.attn, o.mlp) for o in report.mechanism.origin) else ""
    title = ("resid_sum = LN(resid_in + attn) + mlp at the coordinate (post-LN: the sum before the block's last LayerNorm)" if post_ln
             else "resid_out = scale x (resid_in + attn + mlp + ple) at the coordinate (the branches as they land, after any norm; "
                  f"scale: the block's layer scalar{lacking})" if ple
             else f"resid_out = resid_in + attn + mlp at the coordinate (attn and mlp as they land, after any branch norm{lacking})")
    columns = ["dim", "block", "role", "where", "resid_in", "attn", "mlp", *(["ple", "scale"] if ple else []), "resid_out", "writer"]
    table = style.table(title, *columns, right=tuple(i for i in range(len(columns) - 1) if i not in (2, 3)))
    out: list = [table]
    for o in sorted(report.mechanism.origin, key=lambda o: (o.dim, o.layer)):
        who = {"mlp": "MLP", "attn": "attention", "ple": "per-layer input"}[o.writer]
        if o.cause == "median":
            who = "none: the median grew"
        extra = [num(o.ple, True), f"{o.scale:.4g}" if o.scale is not None else "-"] if ple else []
        add_row(table, str(o.dim), str(o.layer), o.role, where(o.text, o.position, o.token), num(o.resid_in, True), num(o.attn, True),
                num(o.mlp, True), *extra, num(o.resid_out, True), who)
        if o.norm is not None:
            n = o.norm
            norm = style.table(
                f"Block {o.layer}, dim {o.dim}: {n.parameter.removesuffix('.weight')} turns raw into landed = normalisation x "
                "centered x gain + bias",
                "raw", "centered", "normalisation", "gain", "stored weight", "bias", "landed", "median gain", "gain / median", "amplifier",
                right=tuple(range(9)),
            )
            add_row(norm, num(n.raw, True), num(n.centered, True), f"{n.normalization:.4g}", f"{n.gain:.4g}", f"{n.weight:.4g}",
                    f"{n.bias:.3g}", num(n.landed, True), f"{n.typical_gain:.3g}", f"{n.gain_ratio:.1f}x", "yes" if n.amplifier else "no")
            out.append(norm)
        if o.heads:
            out.append(_heads_table(style, o.layer, o.dim, o.heads, ""))
    return out


def _heads_table(style: Style, layer: int, dim: int, heads: list[HeadShare], stream: str) -> Table:
    """The top heads of block ``layer``'s attention output at ``dim`` (written into ``stream``, with hyper-connections)."""
    into = f", written into stream {stream}" if stream else ""
    table = style.table(f"Attention heads of block {layer} into dim {dim}{into}", "head", "contribution", "share", right=(0, 1, 2))
    for h in heads[:8]:
        add_row(table, str(h.head), num(h.contribution, True), f"{h.share:.1%}")
    return table


def _anatomy_tables(style: Style, a: Anatomy, gated: bool, dims: list[int]) -> list:
    table = style.table(
        f"Block {a.layer} MLP at {where(a.text, a.position, a.token)} ({a.role} of dim{'s' if len(dims) > 1 else ''} "
        f"{', '.join(map(str, dims))})",
        "checkpoint", "size", "max |v|", "at", "median |v|", "top1/median", "vs", "change in max", "x sharper",
        right=(1, 2, 3, 4, 5, 7, 8),
    )
    for p in a.checkpoints:
        change = f"{num(p.change, True)} ({p.change_pct:+.0f}%)" if p.change is not None else "-"
        add_row(table, p.name, str(p.size), num(p.max), str(p.argmax), num(p.median), ratio(p.ratio), p.previous or "-", change,
                f"{p.jump:.2f}" if p.jump else "-")
    impact = a.activation_impact
    pre = "gate" if gated else "up"
    lines = Text(
        f"Explosion point: {a.explosion_point} (largest growth of top1/median).\n"
        f"Activation {impact.function} on the {pre} pre-activation, over all {impact.neurons} neurons: "
        f"{impact.suppressed} suppressed (|after| < 10% of |before|), {impact.flipped} flipped sign, "
        f"{impact.kept_mass:.1%} of the total |value| kept; median |v| {num(impact.median_before)} -> {num(impact.median_after)}."
    )
    neurons = style.table(
        "Top neurons (by contribution) through the activation", "neuron", f"{pre} (before)", "after act",
        *(["up", "act x up"] if gated else []),
        right=(0, 1, 2, 3, 4),
    )
    for n in impact.top[:5]:
        add_row(neurons, str(n.neuron), num(n.before, True), num(n.after, True),
                *([num(n.up, True), num(n.product, True)] if gated else []))
    return [table, lines, neurons]


def _attribution_tables(style: Style, a: Attribution, with_weights: bool) -> list:
    head = Text(
        f"Block {a.layer} mlp_out[{a.dim}] = {num(a.output, True)} at {where(a.text, a.position, a.token)} ({a.role}): "
        f"sum of activation x weight over all neurons + bias {num(a.bias, True)} matches it to {a.error:.1e} (relative). "
        f"{a.neurons_for_90pct} neuron(s) give 90% of it."
    )
    table = style.table(None, "neuron", "activation", "weight W[dim, i]", "contribution", "share", "cumulative", right=(0, 1, 2, 3, 4, 5))
    cumulative = 0.0
    for n in a.neurons:
        cumulative += n.share
        add_row(table, str(n.neuron), num(n.activation, True), num(n.weight, True), num(n.contribution, True), f"{n.share:.1%}",
                f"{cumulative:.1%}")
    w = a.super_weight
    weight = Text(
        f"Super weight: {w.matrix}[{w.row}, {w.col}] = {w.value:+.4f}, rank {w.rank} of {w.entries:,} entries by |w| "
        f"(the weight from neuron {a.neurons[0].neuron} into dim {a.dim})."
    )
    stats = style.table("MLP weights of the block", "matrix", "shape", "max |w|", "at (row, col)", "mean |w|", right=(2, 4))
    for s in a.weights:
        add_row(stats, s.matrix, "x".join(map(str, s.shape)), num(s.max), f"({s.argmax[0]}, {s.argmax[1]})", num(s.mean))
    return [head, table, weight, *_write_line(a.stream, a.write, a.output, a.landed)] + ([stats] if with_weights else [])


def _write_line(stream: str, write: float | None, output: float, landed: float | None) -> list:
    """With hyper-connections: the write weight that lands the MLP's output in the followed stream (nothing else)."""
    if not stream:
        return []
    return [Text(f"Into stream {stream}: write weight w_mlp[{stream}] = {write:.4g} x mlp_out {num(output, True)} = {num(landed, True)} "
                 "(the shares above are of mlp_out; the write weight is the amplifier between it and the stream).")]


def _expert_tables(style: Style, e: ExpertAttribution) -> list:
    m = e.moe
    experts = style.table(
        f"Block {e.layer} MoE output into dim {e.dim} at {where(e.text, e.position, e.token)}: {m.output:+,.2f} "
        f"(the block itself: {m.actual:+,.2f}, relative gap {m.error:.1e})",
        "expert", "router logit", "router prob", "router weight", "expert output", "contribution", "share", right=(0, 1, 2, 3, 4, 5, 6),
    )
    for x in m.experts + ([m.shared_expert] if m.shared_expert else []):
        add_row(experts, "shared" if x.expert is None else str(x.expert), f"{x.router_logit:.3f}", f"{x.router_prob:.3f}",
                f"{x.router_weight:.3f}", num(x.output, True), num(x.contribution, True), f"{x.share:.1%}")
    name = "the shared expert" if m.top_expert is None else f"expert {m.top_expert}"
    if m.gated:
        neurons = style.table(f"Neurons of {name}: router weight x act(gate) x up x W_down[dim, i]",
                              "neuron", "gate", "up", "act(gate) x up", "W_down", "contribution", "share", right=(0, 1, 2, 3, 4, 5, 6))
    else:  # one pre-activation, up
        neurons = style.table(f"Neurons of {name}: router weight x act(up) x W_down[dim, i]",
                              "neuron", "up", "act(up)", "W_down", "contribution", "share", right=(0, 1, 2, 3, 4, 5))
    for n in m.neurons:
        add_row(neurons, str(n.neuron), *([num(n.gate, True)] if m.gated else []), num(n.up, True), num(n.activation, True),
                f"{n.weight:+.4f}", num(n.contribution, True), f"{n.share:.1%}")
    w = m.super_weight
    line = Text(f"Super weight: {w.matrix}[{', '.join(map(str, w.index))}] = {w.value:+.4f} (rank {w.rank} of {w.entries:,} by |w|).")
    return [experts, neurons, line, *_write_line(e.stream, e.write, m.actual, e.landed)]


def _verification_tables(style: Style, report: Report) -> list:
    v = report.causal.verification
    masked = v.metric == "masked-LM"
    if masked:
        out: list = [Text(f"Masked-LM loss on {v.eval_tokens} masked tokens (a fixed, seeded 15%, the same for every intervention) of "
                          f"{v.eval_source}: {v.masked_lm_loss:.3f} unmodified, exp {v.baseline_perplexity:.2f}.")]
    else:
        out = [Text(f"Perplexity on {v.eval_tokens} tokens of {v.eval_source}: {v.baseline_perplexity:.2f} unmodified.")]
    if report.causal.default:
        out.insert(0, Text(report.causal.default[0].upper() + report.causal.default[1:] + "."))
    table = style.table(None, "dim", "block", "intervention", "value at birth", "value at last block", "massive",
                        "exp(MLM loss)" if masked else "perplexity", "x baseline", "confirms", right=(0, 1, 3, 4, 6, 7))
    for r in v.interventions:
        add_row(
            table, str(r.dim), str(r.layer), r.name,
            num(r.value_birth, True) if r.value_birth == r.value_birth else "-",
            num(r.value_last, True) if r.value_last == r.value_last else "-",
            "yes" if r.still_massive else "no",
            num(r.perplexity) if r.perplexity is not None else "",
            f"{r.perplexity_ratio:,.2f}" if r.perplexity_ratio is not None else "",
            {True: "yes", False: "no", None: ""}[r.confirms],
        )
    out.append(table)
    dependence = style.table("Input dependence at the birth block", "dim", "block", "inputs", "first-token mean", "std",
                             "first token massive", "carried by", right=(0, 1, 2, 3, 4, 5))
    for d in v.input_dependence:
        carriers = ", ".join(f"{token!r} x{count}" for token, count in d.carriers) or "-"
        add_row(dependence, str(d.dim), str(d.layer), str(d.inputs), num(d.first_token_mean, True), num(d.first_token_std),
                f"{d.first_token_massive}/{d.inputs}", carriers)
    out.append(dependence)
    if v.output_effects:
        out.append(_output_effects_table(style, v))
    out += [Text(f"- {claim}") for claim in v.claims]
    return out


def _shifts(shifts) -> str:
    return ", ".join(f"{s.token!r} {100 * s.before:.2f}->{100 * s.after:.2f}%" for s in shifts[:2])


def _output_effects_table(style: Style, v) -> Table:
    """What each intervention takes from the predictions (the mean over the evaluation positions)."""
    positions = v.output_effects[0].positions
    table = style.table(
        f"What the output loses: mean over {positions} {'masked' if v.metric == 'masked-LM' else 'next-token'} predictions, "
        "against the unmodified model",
        "intervention", "KL (nats)", "stopwords", "punctuation", "rise most (mean probability)", "fall most", right=(1,),
    )
    for e in v.output_effects:
        add_row(table, e.name, f"{e.kl:.3g}", f"{e.stopword_before:.1%} -> {e.stopword_after:.1%}",
                f"{e.punctuation_before:.1%} -> {e.punctuation_after:.1%}", _shifts(e.rises), _shifts(e.falls))
    return table


def _attention_tables(style: Style, report: Report) -> list:
    a = report.causal.attention
    shown = a.tokens[:12]
    tokens = style.table(None, "text", "pos", "token", "dims", "why", right=(0, 1))
    for t in shown:
        add_row(tokens, str(t.text), str(t.position), repr(t.token), ", ".join(map(str, t.dims)), t.reason)
    out: list = [Text(f"Sink tokens: {len(a.tokens)} in {len({t.text for t in a.tokens})} text(s). Rule: {a.rule}."), tokens]
    out += ([Text(f"... and {len(a.tokens) - len(shown)} more in report.json")] if len(a.tokens) > len(shown) else [])
    if not a.share:
        return out + [Text(a.summary[0].upper() + a.summary[1:] + ".")]
    queries = "every query (bidirectional)" if a.causal is False else "the later queries"
    under = {c.label: c for c in a.interventions}
    columns = ["block", "attention on sinks", "uniform", f"sink rate (> {a.epsilon:g})", "value norm ratio", "output share",
               "no-op heads", "sink"] + [f"{label}: rate, sink" for label in under]
    table = style.table(
        f"Per block, averaged over {queries} of {a.texts} text(s) and over heads (value norm ratio and output share: median over "
        f"heads); {a.values}", *columns, right=(0, 1, 2, 3, 4, 5, 6),
    )
    heads = len(a.share[0])
    kinds = report.model.blocks
    for layer, (shares, uniform) in enumerate(zip(a.share, a.uniform)):
        if a.softmax_layers and layer not in a.softmax_layers:  # a convolution or a linear attention: no probabilities
            add_row(table, str(layer), f"no softmax ({kinds[layer]})" if kinds else "no softmax", *[""] * (len(columns) - 2))
            continue
        cells = [str(layer), f"{_mean(shares):.1%}", f"{_mean(uniform):.1%}", f"{a.rate[layer]:.0%}",
                 _median(a.value_ratio[layer]) if a.value_ratio else "-",
                 _median(a.output_share[layer], percent=True) if a.output_share else "-",
                 f"{a.noop_heads[layer]}/{heads}" if a.noop_heads else "-", "yes" if layer in a.sink_layers else ""]
        for c in under.values():
            kept = {True: "kept", False: "lost", None: ""}[c.survives[layer]]
            cells.append(f"{c.rate[layer]:.0%} {kept}".rstrip())
        add_row(table, *cells)
    out.append(table)
    out += _mixing_tables(style, a)
    lines = [a.summary[0].upper() + a.summary[1:] + "."]
    if a.mixing:
        lines.append(a.mixing[0].upper() + a.mixing[1:] + ".")
    if a.noop_heads:
        lines.append(f"No-op heads (>= 50% of their attention on the sink tokens, whose value vectors are under half the median value "
                     f"norm of the others): {sum(a.noop_heads)} of {heads * len(a.share)} heads.")
    if a.dependence:
        lines.append(a.dependence[0].upper() + a.dependence[1:] + ".")
    return out + [Text(line) for line in lines]


def _mixing_tables(style: Style, a) -> list:
    """Per softmax block and head, where the family has them: the output gate at the sink tokens and elsewhere, and
    the attention a learned sink takes beside the first token's; per block, how often an indexer picks the sink."""
    out = []
    if a.gate_sink is not None:
        table = style.table("Gated attention: the mean gate sigmoid(gate) per head, at the sink tokens / at the other tokens",
                            "block", *[f"head {h}" for h in range(len(a.gate_sink[0]))], right=tuple(range(len(a.gate_sink[0]) + 1)))
        for layer, (sink, other) in enumerate(zip(a.gate_sink, a.gate_other)):
            if not all(v != v for v in sink):
                add_row(table, str(layer), *(f"{x:.3f} / {y:.3f}" for x, y in zip(sink, other)))
        out.append(table)
    if a.learned_sink is not None:
        table = style.table("Learned sinks: the attention mass the learned sink logit takes per head / the first token's",
                            "block", *[f"head {h}" for h in range(len(a.learned_sink[0]))], right=tuple(range(len(a.learned_sink[0]) + 1)))
        for layer, (taken, first) in enumerate(zip(a.learned_sink, a.first_token)):
            if not all(v != v for v in taken):
                add_row(table, str(layer), *(f"{x:.1%} / {y:.1%}" for x, y in zip(taken, first)))
        out.append(table)
    if a.indexer_selected is not None:
        table = style.table("Sparse attention: the share of the queries that can see a sink token whose indexer picked it among "
                            "their keys", "block", "sink picked", right=(0, 1))
        for layer, picked in enumerate(a.indexer_selected):
            if picked == picked:
                add_row(table, str(layer), f"{picked:.1%}")
        out.append(table)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _median(values: list[float | None], percent: bool = False) -> str:
    finite = sorted(v for v in values if v is not None and v == v)
    if not finite:
        return "-"
    middle = finite[len(finite) // 2] if len(finite) % 2 else (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2
    return f"{middle:.1%}" if percent else f"{middle:.3g}"


_METHODS = {"rtn": "RTN", "gguf": "GGUF", "activation": "activations"}


def _quantization_tables(style: Style, q: Quantization) -> list:
    held = "; ".join(f"{name}{index} = {value:+.4g}" for name, index, value in q.super_weights) or "none found"
    grid = (f"\nHeld out (left out of the range, put back in full precision): {held}. Clip: the other weights of each matrix clipped "
            f"at mean +/- z x std before quantizing. Blocks: flat blocks of consecutive entries; groups: along each row's inputs.\n"
            f"Grid {q.grid!r}, {len(q.rows)} settings in {q.seconds:.0f} s; {q.massive_tokens} of the {q.eval_tokens} evaluation "
            "tokens carry a massive activation (kept in float where said); massive error: their share of the summed squared int8 "
            "error.")
    out: list = [Text(
        f"Fake-quantized: the {q.matrices} linear projections of the blocks ({q.parameters:,} weights; not the embeddings, "
        f"the output head or the norms). Perplexity on {q.eval_tokens} tokens of {q.eval_source}: {q.baseline_perplexity:.2f} in float. "
        f"Massive value: dim {q.dim} at position {q.position} of its probe text, {num(q.value_birth, True)} at its birth block "
        f"{q.birth_layer} and {num(q.value_peak, True)} at its peak block {q.peak_layer}." + (grid if q.rows else "")
    )]
    both = q.peak_layer != q.birth_layer  # where the birth block is the peak, one column says it
    blocks = [f"at block {q.birth_layer} (kept)"] + ([f"at block {q.peak_layer} (kept)"] if both else [])
    table = style.table(None, "setting", "variant", "perplexity", "x float", *blocks, "massive error",
                        right=tuple(range(2, 5 + len(blocks))))
    for r in q.rows:
        values = [f"{num(r.value_birth, True)} ({r.kept_birth:.1%})"] + ([f"{num(r.value_peak, True)} ({r.kept_peak:.1%})"] if both else [])
        add_row(table, f"{_METHODS[r.method]} {r.setting}", r.variant, num(r.perplexity), f"{r.perplexity_ratio:,.2f}", *values,
                f"{r.massive_error_share:.1%}" if r.massive_error_share is not None else "")
    if q.rows:
        out.append(table)
    out += [Text(f"- {note}") for note in q.notes]
    if q.engines:
        out += _engine_tables(style, q)
    return out


_KINDS = {"all": "everything quantized", "protected": "protect list in float", "control": "random control in float",
          "sparse": "super weights restored"}


def _engine_tables(style: Style, q: Quantization) -> list:
    """The real engines' rows: each engine four ways, the protect list against a seeded random control."""
    given = {r.engine: ", ".join(f"{k} {v}" for k, v in r.settings.items()) for r in q.engines}
    head = Text("Real quantization engines: the block projections (nn.Linear) quantized by the library, modules kept in float, "
                "or the super weights' quantization error added back (" + "; ".join(f"{e}: {w}" for e, w in given.items()) + ").")
    table = style.table(None, "engine", "way", "perplexity", "x float", f"at block {q.birth_layer} (kept)", "weights MiB (float)",
                        "in float", right=(2, 3, 4, 5))
    for r in q.engines:
        add_row(table, r.engine, _KINDS[r.kind],
                num(r.perplexity), f"{r.perplexity_ratio:,.2f}", f"{num(r.value_birth, True)} ({r.kept_birth:.1%})",
                f"{r.weight_bytes / 2**20:,.1f} ({r.float_bytes / 2**20:,.1f})",
                ", ".join(r.modules_in_float) or (f"{r.corrections} entries" if r.kind == "sparse" else "-"))
    return [head, table, *_refused_lines(q), *(Text(words[0].upper() + words[1:] + ".") for words in q.engine_words)]


def _refused_lines(q: Quantization) -> list:
    """Per engine and reason, the block projections it cannot take, named: they stay in float in every way."""
    lines = []
    for engine in dict.fromkeys(r.engine for r in q.engines):
        first = next(r for r in q.engines if r.engine == engine)
        by_reason: dict[str, list[str]] = {}
        for module, why in first.refused.items():
            by_reason.setdefault(why, []).append(module)
        for why, modules in by_reason.items():
            lines.append(Text(f"- {engine} cannot take {len(modules)} block projection{'s' if len(modules) != 1 else ''}, kept in float "
                              f"in every way ({why}): {', '.join(modules)}"))
    return lines


def _precision_tables(style: Style, p: Precision) -> list:
    out: list = [Text(p.summary[0].upper() + p.summary[1:] + ".")]
    table = style.table(None, "block", "max |a|", "dim", "float16 headroom", "overflows", right=(0, 1, 2, 3))
    for b in p.blocks:
        if b.max_abs != b.max_abs:  # NaN: a saved inf reads back as NaN too; an overflowing block's largest |a| was inf
            add_row(table, str(b.layer), "inf" if b.overflows else "NaN", str(b.dim), "0.0x" if b.overflows else "-",
                    "yes" if b.overflows else "")
        else:
            add_row(table, str(b.layer), num(b.max_abs), str(b.dim), f"{b.headroom:,.1f}x", "yes" if b.overflows else "")
    return out + [table]


def quantization_text(q: Quantization | None, p: Precision | None, width: int = 140) -> str:
    """The quantization and precision sections alone, as plain text: what `massact quant` writes when there is no whole
    report."""
    style, parts = Style(True), []
    if q is not None:
        parts += [style.heading(section("quantization").heading), *_quantization_tables(style, q)]
    if p is not None:
        parts += [style.heading(section("precision").heading), *_precision_tables(style, p)]
    return plain_text(parts, width)


def _valley_tables(style: Style, report: Report) -> list:
    """Per block: the entropy of the token representations and the first token's share of the norm, with and without
    the massive tokens; then what they say."""
    v = report.valley
    table = style.table(
        f"Per block, the mean over {len(v.texts)} text(s) (windows {', '.join(map(str, v.texts))}) of the matrix-based entropy of "
        "the block output's token rows (Shannon entropy of the eigenvalues of X X^T / tr, rows not centered, over log(tokens)) "
        "and of the first token's share of ||X||^2, with all tokens and without the massive ones",
        "block", "entropy", "without massive", "first token's share", "without massive", "massive tokens", "their share",
        "mark", right=(0, 1, 2, 3, 4, 5, 6))
    cell = lambda value, form: "-" if value != value else format(value, form)
    for layer, entropy in enumerate(v.entropy):
        marks = [word for word, at in (("valley", v.valley), ("valley without massive", v.valley_without), ("birth", v.birth))
                 if at == layer]
        add_row(table, str(layer), cell(entropy, ".3f"), cell(v.entropy_without[layer], ".3f"), cell(v.first_share[layer], ".1%"),
                cell(v.first_share_without[layer], ".1%"), str(v.massive_tokens[layer]), cell(v.massive_share[layer], ".1%"),
                ", ".join(marks))
    return [table, Text(v.summary[0].upper() + v.summary[1:] + ".")]


_BODIES = {
    "layers": lambda style, report: [_layer_table(style, report)],
    "massive": _massive_tables,
    "lifeline": lifeline_tables,
    "origin": _origin_tables,
    "anatomy": _anatomy_body,
    "attribution": _attribution_body,
    "trigger": trigger_tables,
    "super-weights": lambda style, report: super_weight_tables(style, report) if report.causal.super_weights else [],
    "verification": lambda style, report: _verification_tables(style, report) if report.causal.verification else [],
    "sinks": lambda style, report: _attention_tables(style, report) if report.causal.attention else [],
    "quantization": lambda style, report: _quantization_tables(style, report.deploy.quantization) if report.deploy.quantization else [],
    "precision": lambda style, report: _precision_tables(style, report.deploy.precision) if report.deploy.precision else [],
    "valley": lambda style, report: _valley_tables(style, report) if report.valley is not None else [],
    "qk": lambda style, report: qk_tables(style, report.qk),
    "warnings": lambda style, report: [Text(f"- {w}", style="" if style.plain else "yellow") for w in report.warnings],
    "conclusion": lambda style, report: [Text(paragraph + "\n") for paragraph in report.conclusion],
}


def to_text(report: Report, width: int = 140) -> str:
    """The report as plain UTF-8 text (no colour codes), for report.txt."""
    return plain_text(renderables(report, plain=True), width)


def print_report(report: Report, console: Console | None = None) -> None:
    """The whole report: in colour in a terminal, and in a pipe or file the very text of report.txt."""
    console = console or terminal()
    if console.is_terminal:
        console.print(Group(*renderables(report, plain=False)))
    else:
        console.file.write(to_text(report))


def section_text(report: Report, key: str, width: int = 140) -> str:
    """One section as plain text, as it stands in report.txt."""
    return plain_text(section_renderables(report, key, Style(True)), width)


def print_section(report: Report, key: str, console: Console | None = None) -> None:
    console = console or terminal()
    if console.is_terminal:
        console.print(Group(*section_renderables(report, key, Style(False))))
    else:
        console.file.write(section_text(report, key))


def terminal() -> Console:
    """A console for stdout: the terminal's width there, the text file's width when output goes to a pipe or file."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=140)
