"""The report on one screen: what `massact scan` prints by default and the HTML page's summary card.

The same facts in both: the model and the criterion, one row per massive dim, the mechanism in a few short sentences per
dim, the verification's verdicts, the sink and the float16 headroom. report.txt holds everything else.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.text import Text

from ..analysis.results import Report
from ..numbers import short
from .conclusion import story, super_expert_words
from .tables import Style, add_row, plain_text, spans

SHOWN_DIMS = 3  # dims told in sentences; the table lists up to TABLE_DIMS, report.txt all of them
TABLE_DIMS = 8
SHOWN_VERDICTS = 6
# The sentence kinds of a dim's story that the screen keeps: where it is born, who makes it, what fires it, where it goes.
KINDS = ("birth", "neurons", "experts", "heads", "super weight", "trigger", "erasure")
COLUMNS = ("dim", "tokens", "born at", "writer", "top neuron", "super weight", "peak (x median)", "erased at")


@dataclass(kw_only=True)
class Summary:
    """The screen's facts as words: ``rows`` match COLUMNS, ``mechanism`` holds (dim, sentences) strongest first,
    ``more`` what did not fit ('2 more dim(s)')."""

    title: str
    criterion: str
    rows: list[list[str]]
    mechanism: list[tuple[int, list[str]]]
    verdicts: list[str]
    function: list[str]
    more: str


def summarize(report: Report) -> Summary:
    m, c = report.model, report.findings.criterion
    dims = sorted(report.findings.dims, key=lambda d: -abs(d.max_value))
    verification = report.causal.verification
    verdicts = [_verdict(r) for r in verification.interventions if r.confirms is not None] if verification else []
    more = []
    if len(dims) > SHOWN_DIMS:
        more.append(f"{len(dims) - SHOWN_DIMS} more dim(s)")
    if len(verdicts) > SHOWN_VERDICTS:
        more.append(f"{len(verdicts) - SHOWN_VERDICTS} more verdict(s)")
    return Summary(
        title=f"{m.name}: {m.architecture}, {m.n_layers} blocks, d_model {m.d_model}, {m.dtype} on {m.device}; "
              f"{report.corpus.texts} text(s), {report.corpus.tokens} tokens",
        criterion=f"Massive: |a| >= {c.min_abs:g} and >= {c.min_ratio:g} x the median |a| of the block. "
                  + (f"{len(dims)} massive dim(s)." if dims else "None found."),
        rows=[_row(report, d.dim) for d in dims[:TABLE_DIMS]],
        mechanism=[(d.dim, _first_of_each(story(report, d.dim))) for d in dims[:SHOWN_DIMS]],
        verdicts=(["Not verified: run with --verify, or `massact verify DIR`."] if report.findings.dims and not report.causal.verification
                  else verdicts[:SHOWN_VERDICTS]),
        function=_function_lines(report),
        more="; ".join(more),
    )


def _first_of_each(sentences: list[tuple[str, str]]) -> list[str]:
    """The first sentence of each kind the screen keeps, in the story's order."""
    seen: set[str] = set()
    kept = []
    for kind, sentence in sentences:
        if kind in KINDS and kind not in seen:
            seen.add(kind)
            kept.append(sentence)
    return kept


def _row(report: Report, dim: int) -> list[str]:
    summary = next(d for d in report.findings.dims if d.dim == dim)
    birth = next((o for o in report.mechanism.origin if o.dim == dim and o.role == "birth"), None)
    line = next(x for x in report.mechanism.lifelines if x.dim == dim)
    who = {"mlp": "MLP", "attn": "attention", "ple": "per-layer input"}
    if birth is None:  # hyper-connections: the stream origin at the birth block names the writer, and the stream
        origin = next((o for o in report.mechanism.streams if o.dim == dim and o.layer == summary.born_at), None)
        writer = f"{who.get(origin.carrier, 'stream mixing')} ({origin.stream})" if origin is not None else "-"
    else:
        writer = who[birth.writer]
    attribution = next((a for a in report.mechanism.attribution if a.dim == dim and a.role == "birth"), None)
    expert = next((e.moe for e in report.mechanism.experts if e.dim == dim and e.role == "birth"), None)
    neuron, weight = "-", "-"
    if attribution is not None:
        w = attribution.super_weight
        neuron = f"{attribution.neurons[0].neuron} ({attribution.neurons[0].share:.0%})"
        weight = f"{_matrix(w.matrix)}[{w.row}, {w.col}]"
    elif expert is not None:
        w = expert.super_weight
        top = expert.top_expert if expert.top_expert is not None else "shared"
        neuron = f"expert {top} / {expert.neurons[0].neuron} ({expert.neurons[0].share:.0%})"
        weight = f"{_matrix(w.matrix)}[{', '.join(map(str, w.index))}]"
    elif birth is not None and birth.heads:
        neuron = f"head {birth.heads[0].head} ({birth.heads[0].share:.0%})"
    elif birth is None and origin is not None and origin.heads:  # hyper-connections: the heads of the stream origin
        neuron = f"head {origin.heads[0].head} ({origin.heads[0].share:.0%})"
    ratio = max((e.ratio for e in report.findings.massive if e.dim == dim), default=float("nan"))
    tokens = repr(summary.tokens[0]) + (f" +{len(summary.tokens) - 1} more" if len(summary.tokens) > 1 else "")
    return [str(dim), tokens, str(summary.born_at), writer, neuron, weight,
            f"{short(line.peak, True)} at {line.peak_layer} ({short(ratio)}x)", spans(line.erased_at) if line.erased_at else "never"]


def _matrix(name: str) -> str:
    """'model.layers.2.mlp.down_proj.weight' -> 'down_proj': the block is the birth block, in its own column."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def _verdict(r) -> str:
    cost = f", perplexity x{r.perplexity_ratio:,.2f}" if r.perplexity_ratio is not None else ""
    return (f"dim {r.dim}, {r.name}: {'removes it' if r.confirms else 'does not remove it'} "
            f"(block {r.layer}: {short(r.value_birth, True)}{cost})")


def _function_lines(report: Report) -> list[str]:
    out = []
    a = report.causal.attention
    if a is not None:
        clauses = a.summary.split("; ")
        out.append("Sink: " + "; ".join(clauses[:2]) + ".")
        if a.dependence:
            out.append("Sink and massive value: " + a.dependence.split("; ")[0] + ".")
        for clause in a.mixing.split("; ") if a.mixing else []:  # a hybrid's mixers, NoPE blocks, gates, learned sinks
            out.append(clause[0].upper() + clause[1:] + ".")
    if report.mechanism.super_experts is not None and report.mechanism.super_experts.found:
        out += super_expert_words(report.mechanism.super_experts, report.causal.expert_pruning)
    p = report.deploy.precision
    if p is not None and p.blocks and math.isnan(p.largest):  # every block's largest entries are NaN: no magnitude to weigh
        out.append("float16 headroom: not measured, the largest activations are NaN (section 12 says where they begin).")
    elif p is not None and p.blocks:
        largest = f"the largest |a| is {short(p.largest)} (dim {p.largest_dim}, block {p.largest_layer})"
        out.append(f"float16 overflows: {largest}." if p.overflows else f"float16 headroom: {p.headroom:,.1f}x; {largest}.")
    return out


def renderables(report: Report, plain: bool) -> list:
    s, style = summarize(report), Style(plain)
    bold = "" if plain else "bold"
    out: list = [Text(f"massact: {s.title}", style=bold), Text(s.criterion)]
    if s.rows:
        table = style.table(None, *COLUMNS, right=(0, 2))
        for row in s.rows:
            add_row(table, *row)
        out.append(table)
    out += [Text(" ".join(sentences)) for _, sentences in s.mechanism]
    if s.verdicts:
        out.append(Text("Verification:", style=bold))
        out += [Text(f"  {v}") for v in s.verdicts]
    out += [Text(line) for line in s.function]
    if s.more:
        out.append(Text(f"{s.more} in report.txt."))
    return out


def written_lines(paths: list[Path]) -> list[str]:
    """'wrote PATH' for each file, the figures on one line: the paths stay on one screen."""
    figures = [p for p in paths if p.suffix == ".png"]
    lines = [f"wrote {p}" for p in paths if p.suffix != ".png"]
    if figures:
        lines.append(f"wrote {len(figures)} figure(s) in {figures[0].parent}:")
        lines += textwrap.wrap(", ".join(p.name for p in figures), width=118, initial_indent="  ", subsequent_indent="  ")
    return lines


def to_text(report: Report, width: int = 120) -> str:
    """The screen as plain text, as `massact scan` prints it to a pipe."""
    return plain_text(renderables(report, plain=True), width)


def show(report: Report, console: Console) -> None:
    """The screen: in colour in a terminal (at most 120 columns wide), as ``to_text`` in a pipe or file."""
    if console.is_terminal:
        Console(highlight=False, width=min(console.width, 120)).print(Group(*renderables(report, plain=False)))
    else:
        console.file.write(to_text(report))
