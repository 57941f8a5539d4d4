"""One self-contained HTML page to explore the report: a summary card, a token view, interactive figures, every section
as sortable and foldable tables, navigation from a block or a dim to its anatomy and attribution.

No library: the figures are SVG drawn by about 240 lines of plain JavaScript (report/page.js) from the report's own
numbers, embedded as JSON. A Content-Security-Policy forbids every request, so the page works offline and cannot leak.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from importlib import resources

from rich.rule import Rule
from rich.table import Table

from ..analysis.results import Report
from . import summary as screen
from .plots import FIGURES, PIXELS
from .schema import finite
from .sections import EXTRAS, SECTIONS
from .tables import Style
from .text import header, section_renderables

SHOWN_TEXTS = 20  # texts listed in the settings table; the JSON has every text the report points at
FOLDED_ROWS = 12  # tables longer than this start folded


def policy(scripts: Iterable[str], styles: Iterable[str]) -> str:
    """A page's Content-Security-Policy: nothing may be fetched (no network, no other file; images only from data:
    URIs), and only the page's own inline ``scripts`` and ``styles`` run, each allowed by its sha256, so that a script
    that ever got into the page would not run."""
    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"

    return (f"default-src 'none'; img-src data:; style-src {' '.join(map(digest, styles))}; "
            f"script-src {' '.join(map(digest, scripts))}")


# Counts, for a reader and for the browser test, what the page asked for that the policy refused, the requests it made
# (none: every image is a data URI) and the images that really loaded. A refusal is reported by an event that may come
# after the load event: the count is written again at each one.
WATCH = """
var refused = 0;
document.addEventListener("securitypolicyviolation", function () {
  refused += 1;
  if (document.body) document.body.setAttribute("data-refused", refused);
});
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images), body = document.body;
  body.setAttribute("data-images-total", images.length);
  body.setAttribute("data-images-loaded", images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  body.setAttribute("data-requests", performance.getEntriesByType("resource").length);
  body.setAttribute("data-refused", refused);
});
"""


def head(title: str, scripts: Sequence[str] = ()) -> str:
    """A page's start, up to its body: the policy (``policy``) that forbids every request and runs only the page's own
    style, watcher and ``scripts`` (the inline scripts that come later in its body, each exactly as written there)."""
    style = asset("page.css")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy([WATCH, *scripts], [style])}">
<title>{html.escape(title)}</title><style>{style}</style>
<script>{WATCH}</script></head>
"""


def figure(anchor: str, name: str, png: bytes, caption: str) -> str:
    """A PNG embedded as a data URI, with its caption and file name."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{anchor}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
            f'width="{PIXELS[0]}" height="{PIXELS[1]}"><figcaption>{html.escape(caption)} ({name})</figcaption></figure>')


def asset(name: str) -> str:
    return resources.files("massact.report").joinpath(name).read_text(encoding="utf-8")


def _cell(text: str, key: str, column: str, anchors: set[str]) -> str:
    """A table cell; in the layer scan, anatomy and attribution sections the first cell naming a block is its anchor."""
    escaped = html.escape(text)
    if key in ("layers", "anatomy", "attribution") and column == "block" and text.isdigit():
        anchor = f"{key}-block-{text}"
        if anchor not in anchors:
            anchors.add(anchor)
            return f'<td id="{anchor}">{escaped}</td>'
    return f"<td>{escaped}</td>"


_ANCHORS = {  # the paragraph or table title that opens a block's or a dim's part of a section
    "anatomy": re.compile(r"^Block (?P<block>\d+) MLP at .*\(\w+ of dims? (?P<dims>[\d, ]+)\)"),
    "attribution": re.compile(r"^Block (?P<block>\d+) mlp_out\[(?P<dims>\d+)\]"),
    "lifeline": re.compile(r"^dim (?P<dims>\d+) at "),
}


def _anchor_for(text: str, key: str, anchors: set[str]) -> str:
    """Empty anchors for the first paragraph or table title of each block and dim in the anatomy, attribution and
    lifeline sections, to put inside it: the page's links and clicks jump there."""
    found = _ANCHORS[key].match(text) if key in _ANCHORS else None
    if not found:
        return ""
    wanted = ([f"{key}-block-{found['block']}"] if "block" in found.groupdict() else [])
    wanted += [f"{key}-dim-{d.strip()}" for d in found["dims"].split(",")]
    new = [name for name in wanted if name not in anchors]
    anchors.update(new)
    return "".join(f'<span class="anchor" id="{name}"></span>' for name in new)


def _table(table: Table, key: str, anchors: set[str]) -> str:
    columns = table.columns
    title = str(table.title) if table.title is not None else ""
    head = "".join(f'<th class="{"num" if c.justify == "right" else ""}">{html.escape(str(c.header))}</th>' for c in columns)
    rows = list(zip(*(list(c.cells) for c in columns)))
    body = "".join("<tr>" + "".join(_cell(str(cell), key, str(c.header), anchors) for cell, c in zip(row, columns)) + "</tr>"
                   for row in rows)
    caption = f"<caption>{_anchor_for(title, key, anchors)}{html.escape(title)}</caption>" if title else ""
    markup = f'<table class="data sortable">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if len(rows) > FOLDED_ROWS:  # long tables start folded: the summary says what they hold
        return f"<details><summary>{html.escape(title or 'table')} ({len(rows)} rows)</summary>{markup}</details>"
    return f'<div class="scroll">{markup}</div>'


def _part(part, key: str, anchors: set[str]) -> str:
    """One rich renderable of report.txt as HTML: the same words, in tables a reader can sort and fold."""
    if isinstance(part, Table):
        return _table(part, key, anchors)
    if isinstance(part, Rule):
        return ""
    text = str(part).strip("\n")
    if "\n  " in text:  # indented lines (phases, chains) keep their layout
        return f"<pre>{_anchor_for(text, key, anchors)}{html.escape(text)}</pre>"
    return f"<p>{_anchor_for(text, key, anchors)}{'<br>'.join(map(html.escape, text.splitlines()))}</p>"


def _sections(report: Report) -> list[tuple[str, str, str]]:
    """(key, heading, body HTML) for every numbered section, the warnings and the conclusion."""
    style, anchors, out = Style(True), set(), []
    for part in SECTIONS + EXTRAS:
        if part.key == "warnings" and not report.warnings:
            continue
        heading, *body = section_renderables(report, part.key, style)
        out.append((part.key, str(heading).strip().removeprefix("## "), "".join(_part(p, part.key, anchors) for p in body)))
    return out


def _settings(report: Report) -> str:
    c, m = report.findings.criterion, report.model
    rows = [(key, str(value)) for key, value in asdict(m).items()]
    rows += [("criterion", f"|a| >= {c.min_abs:g} and |a| >= {c.min_ratio:g} x {c.median}")]
    rows += [("corpus",
              f"{report.corpus.source}: {report.corpus.texts} text(s), {report.corpus.windows} window(s), {report.corpus.tokens} tokens")]
    shown = sorted(report.findings.texts)[:SHOWN_TEXTS]
    rows += [(f"text {i}", report.findings.texts[i]) for i in shown]
    if len(report.findings.texts) > len(shown):
        rows.append(("", f"and {len(report.findings.texts) - len(shown)} more texts the report points at, in report.json"))
    rows += [(f"version of {name}", version) for name, version in report.versions.items()]
    if report.causal.verification:
        rows.append(("evaluation text", f"{report.causal.verification.eval_source}, {report.causal.verification.eval_tokens} tokens"))
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="settings">{cells}</table>'


def card(report: Report) -> str:
    """The summary card: the facts `massact scan` prints on one screen, with each dim and birth block a link."""
    s = screen.summarize(report)
    rows = ""
    for row in s.rows:
        dim, born = row[0], row[2]
        cells = [f'<a href="#anatomy-dim-{dim}" data-dim="{dim}">{dim}</a>', html.escape(row[1]),
                 f'<a href="#anatomy-block-{born}" data-block="{born}">{born}</a>', *map(html.escape, row[3:])]
        rows += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    table = (f'<table class="data"><thead><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in screen.COLUMNS)}</tr></thead>'
             f"<tbody>{rows}</tbody></table>") if rows else ""
    mechanism = "".join(f"<p>{html.escape(' '.join(sentences))}</p>" for _, sentences in s.mechanism)
    verdicts = "".join(f"<li>{html.escape(v)}</li>" for v in s.verdicts)
    function = "".join(f"<p>{html.escape(line)}</p>" for line in s.function)
    return (f'<section id="summary" class="card"><h2>Summary</h2><p><b>{html.escape(s.title)}</b></p><p>{html.escape(s.criterion)}</p>'
            f'<div class="scroll">{table}</div>{mechanism}'
            + (f"<p><b>Verification</b></p><ul>{verdicts}</ul>" if verdicts else "") + function
            + (f"<p>{html.escape(s.more)} in the sections below.</p>" if s.more else "") + "</section>")


def page_data(report: Report) -> dict:
    """What the page's JavaScript draws: the layer profile, each dim's lifeline, the trigger's sources, the token view."""
    layers = [{"block": s.layer, "median": s.median, "top": [[e.value, e.dim] for e in s.top[:3]]} for s in report.findings.layers]
    lifelines = [{"dim": x.dim, "born": x.born_at, "erased": x.erased_at, "token": x.token, "position": x.position, "text": x.text,
                  "steps": [[st.layer, st.value, st.attn, st.mlp, st.resid_in] for st in x.steps]}
                 for x in sorted(report.mechanism.lifelines, key=lambda line: -abs(line.peak))]  # the main dim first: the chart opens on it
    triggers = [{"dim": t.dim, "layer": n.layer, "neuron": n.neuron, "site": s.site, "token": t.token, "position": t.position,
                 "sources": [[p.source, p.here, p.others_mean] for p in s.sources[:10]]}
                for t in report.trigger for n in t.neurons[:1] for s in n.splits[:1]]
    tokens = None
    if report.mechanism.token_values is not None:
        v = report.mechanism.token_values
        sinks = [[t.text, t.position] for t in report.causal.attention.tokens] if report.causal.attention else []
        tokens = {"dims": v.dims, "texts": [{"index": t, "tokens": report.findings.tokens[t][:len(values[0][0])], "values": values}
                                            for t, values in zip(v.texts, v.values)], "sinks": sinks}
    return finite({"layers": layers, "lifelines": lifelines, "triggers": triggers, "tokens": tokens,
                    "anchors": {"anatomy": sorted({a.layer for a in report.mechanism.anatomy}),
                                "attribution": sorted({a.layer for a in report.mechanism.attribution}
                                                      | {e.layer for e in report.mechanism.experts})}})


def to_html(report: Report, pngs: dict[str, bytes]) -> str:
    """The page, with every PNG in ``pngs`` embedded as a data URI and its data as JSON: it needs no other file."""
    title = f"massact report: {report.model.name}"
    sections = _sections(report)
    figures = [figure(f"figure-{name[:-4]}", name, pngs[name], caption) for name, (_, _, caption) in FIGURES.items() if name in pngs]
    toc = [("summary", "Summary"), ("tokens", "Token view"), ("explore", "Interactive figures")]
    toc += [(key, heading) for key, heading, _ in sections] + [("figures", "Figures"), ("settings", "Settings")]
    nav = "".join(f'<li><a href="#{key}">{html.escape(heading)}</a></li>' for key, heading in toc)
    body = "".join(f'<section id="{key}"><h2>{html.escape(heading)}</h2>{content}</section>' for key, heading, content in sections)
    intro = html.escape(str(header(report, plain=True)[1]))
    data = json.dumps(page_data(report), ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    script = asset("page.js")
    return f"""{head(title, [script])}<body>
<nav id="toc"><b>Contents</b><ul>{nav}</ul></nav>
<main>
<h1>{html.escape(title)}</h1>
<p class="intro">{intro}</p>
{card(report)}
<section id="tokens"><h2>Token view</h2>
<p>Each token coloured by a massive dim's value at the chosen block (red positive, blue negative, darker is larger); hover
for the value. Sink tokens are outlined. Only the first tokens of a few texts are kept (report.json: token_values).</p>
<div class="controls"><label>dim <select id="tv-dim"></select></label>
<label>block <input type="range" id="tv-block" min="0" value="0"> <output id="tv-block-out"></output></label></div>
<div id="tv-texts"></div><div id="tv-tip" class="tip" hidden></div></section>
<section id="explore"><h2>Interactive figures</h2>
<p>Hover for the numbers; click a block to jump to its MLP anatomy and neuron attribution.</p>
<h3>Layer profile: top-1..3 and median |a| per block</h3><div id="fig-profile" class="fig"></div>
<h3>Lifeline: <select id="fig-dim"></select> value, attention and MLP per block</h3><div id="fig-lifeline" class="fig"></div>
<h3>Trigger: the writing neuron's sources, at the massive token and elsewhere</h3><div id="fig-trigger" class="fig"></div>
<div id="fig-tip" class="tip" hidden></div></section>
{body}
<section id="figures"><h2>Figures</h2><details><summary>The static figures (PNG, also written beside this page)</summary>
{''.join(figures) or '<p>No figures: nothing massive was found.</p>'}</details></section>
<section id="settings"><h2>Settings</h2>{_settings(report)}</section>
</main>
<script type="application/json" id="massact-data">{data}</script>
<script>{script}</script>
</body></html>
"""
