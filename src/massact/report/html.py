"""One self-contained HTML page: conclusion first, the figures (embedded), the run's settings, every text section."""

from __future__ import annotations

import base64
import html
from dataclasses import asdict

from ..analysis.results import Report
from .plots import FIGURES, PIXELS
from .text import to_text

SHOWN_TEXTS = 20  # texts listed in the settings table; the JSON has every text the report points at

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1280px; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.conclusion { background: #fff7e0; border-left: 4px solid #e0a000; padding: .6em 1em; }
.conclusion p { margin: .4em 0; }
figure { margin: 1.2em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 12px; line-height: 1.3; }
table.settings td { padding: .15em .8em .15em 0; vertical-align: top; }
"""

# Counts the images that really loaded, so a browser test can tell a page with broken figures from a good one.
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images-total", images.length);
  document.body.setAttribute("data-images-loaded", images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
});
"""


def _sections(text: str) -> list[tuple[str, str]]:
    """report.txt cut at its '## ' headings: (heading, body); the first piece is the header."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if line.startswith("## "):
            sections.append((line[3:], []))
        else:
            sections[-1][1].append(line)
    return [(title, "\n".join(body).strip("\n")) for title, body in sections]


def _settings(report: Report) -> str:
    c, m = report.criterion, report.model
    rows = [(key, str(value)) for key, value in asdict(m).items()]
    rows += [("criterion", f"|a| >= {c.min_abs:g} and |a| >= {c.min_ratio:g} x {c.median}")]
    rows += [("corpus", f"{report.corpus.source}: {report.corpus.texts} text(s), {report.corpus.windows} window(s), {report.corpus.tokens} tokens")]
    shown = sorted(report.texts)[:SHOWN_TEXTS]
    rows += [(f"text {i}", report.texts[i]) for i in shown]
    if len(report.texts) > len(shown):
        rows.append(("", f"and {len(report.texts) - len(shown)} more texts the report points at, in report.json"))
    rows += [(f"version of {name}", version) for name, version in report.versions.items()]
    if report.verification:
        rows.append(("evaluation text", f"{report.verification.eval_source}, {report.verification.eval_tokens} tokens"))
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="settings">{cells}</table>'


def to_html(report: Report, pngs: dict[str, bytes]) -> str:
    """The page, with every PNG in ``pngs`` embedded as a data URI: it needs no other file and no network."""
    title = f"massact report: {report.model.name}"
    conclusion = "".join(f"<p>{html.escape(sentence)}</p>" for sentence in report.conclusion)
    figures = []
    for name, (_, _, caption) in FIGURES.items():
        if name in pngs:
            data = base64.b64encode(pngs[name]).decode("ascii")
            figures.append(
                f'<figure id="{name[:-4]}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
                f'width="{PIXELS[0]}" height="{PIXELS[1]}"><figcaption>{html.escape(caption)} ({name})</figcaption></figure>'
            )
    header, *sections = _sections(to_text(report))
    body = "".join(f"<section><h2>{html.escape(t)}</h2><pre>{html.escape(b)}</pre></section>" for t, b in sections if t != "Conclusion")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<pre>{html.escape(header[1])}</pre>
<section><h2>Conclusion</h2><div class="conclusion">{conclusion}</div></section>
<section><h2>Figures</h2>{''.join(figures) or '<p>No figures: nothing massive was found.</p>'}</section>
{body}
<section><h2>Settings</h2>{_settings(report)}</section>
<script>{_IMAGE_CHECK}</script>
</body></html>
"""
