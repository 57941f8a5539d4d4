"""An atlas as files: atlas.json (the schema), atlas.csv (one line per model, a column per field), atlas.html (the
sentences with the rows each rests on, the whole table, the curves) and the curves (atlas_*.png)."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..analysis.atlas.results import Atlas, Row
from ..analysis.atlas.rows import depth
from ..analysis.function.results import QK_THRESHOLD
from ..numbers import short
from . import schema
from .atomic import write_set
from .html import figure, head
from .plots import _figure, png_bytes


def _shares(shares: dict[str, float]) -> str:
    return "; ".join(f"{name} {share:.0%}" for name, share in shares.items())


def _dims(row: Row) -> str:
    return "; ".join(f"{d.dim} ({', '.join(d.tokens)})" for d in row.dims)


# The columns of atlas.csv and of the page's table: (name, the row's value). None is an empty cell: the report has no
# such number (not verified, streamed, a dense model, nothing massive), never a 0.
COLUMNS: tuple[tuple[str, Callable[[Row], object]], ...] = (
    ("model", lambda r: r.model),
    ("report", lambda r: r.report),
    ("family", lambda r: r.architecture.family),
    ("model type", lambda r: r.architecture.model_type),
    ("blocks", lambda r: r.architecture.blocks),
    ("d_model", lambda r: r.architecture.d_model),
    ("parameters", lambda r: r.architecture.parameters),
    ("norms", lambda r: _shares(r.architecture.norms)),
    ("parallel blocks", lambda r: r.architecture.parallel),
    ("mixers", lambda r: _shares(r.architecture.mixers)),
    ("positions", lambda r: _shares(r.architecture.positions) or None),
    ("rotary share of head dims", lambda r: r.architecture.rotary),
    ("experts", lambda r: r.architecture.experts),
    ("experts per token", lambda r: r.architecture.top_k),
    ("shared experts", lambda r: r.architecture.shared if r.architecture.experts is not None else None),
    ("expert blocks", lambda r: r.architecture.expert_blocks if r.architecture.experts is not None else None),
    ("residual streams", lambda r: r.architecture.streams),
    ("streamed", lambda r: r.streamed),
    ("verified", lambda r: r.verified),
    ("massive dims (tokens)", lambda r: _dims(r) or None),
    ("top |a|", lambda r: r.top),
    ("top block", lambda r: r.top_block),
    ("median |a| there", lambda r: r.median),
    ("top / median", lambda r: r.ratio),
    ("lead dim", lambda r: r.lead),
    ("birth block", lambda r: r.birth),
    ("birth depth", lambda r: r.birth_depth),
    ("writer", lambda r: r.writer),
    ("top neuron", lambda r: r.neuron),
    ("its expert", lambda r: r.expert),
    ("top neuron share", lambda r: r.neuron_share),
    ("super weight", lambda r: r.super_weight),
    ("super weight value", lambda r: r.super_weight_value),
    ("erased at", lambda r: (", ".join(map(str, r.erased_at)) or "never") if r.erased_at is not None else None),
    ("sink rate", lambda r: r.sink_rate),
    ("has a sink", lambda r: r.has_sink),
    ("first sink block", lambda r: r.first_sink),
    ("attention on the sink tokens", lambda r: r.sink_share),
    ("sink positions", lambda r: ", ".join(map(str, r.sink_positions)) or None),
    ("gate at the sink", lambda r: r.gate_sink),
    ("gate elsewhere", lambda r: r.gate_other),
    ("learned sink share", lambda r: r.learned_sink),
    ("sink blocks kept, massive zeroed", lambda r: None if r.sink_kept is None else f"{r.sink_kept} of {r.sink_reached}"),
    ("sink survives zeroing", lambda r: r.sink_survives),
    ("valley block", lambda r: r.valley),
    ("valley depth", lambda r: r.valley_depth),
    ("valley - birth", lambda r: r.valley_from_birth),
    ("entropy drop into the valley", lambda r: r.valley_drop),
    ("entropy drop, massive tokens left out", lambda r: r.valley_drop_without),
    ("float16 headroom", lambda r: r.headroom),
    ("super experts", lambda r: None if r.super_experts is None else "; ".join(f"block {b} expert {e}" for b, e in r.super_experts)),
    ("Q/K top max/mean", lambda r: r.qk_ratio),
    ("Q/K top dim's band", lambda r: r.qk_band),
    ("Q/K heads with a massive dim", lambda r: r.qk_heads),
    ("perplexity x, Q/K massive zeroed", lambda r: r.qk_perplexity),
    ("perplexity x, control", lambda r: r.qk_control),
)


def _csv_cell(value) -> str:
    """A value as atlas.csv writes it: exact (a float's shortest repr), empty for None and for NaN."""
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _page_cell(value) -> str:
    """A value as the page shows it: numbers for reading, "-" where the report has none."""
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return short(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_csv(atlas: Atlas) -> str:
    """atlas.csv's text: a header line, then one line per model, in the atlas's order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in COLUMNS])
    for row in atlas.rows:
        writer.writerow([_csv_cell(value(row)) for _, value in COLUMNS])
    return buffer.getvalue()


def to_json(atlas: Atlas) -> str:
    """atlas.json's text, written by the schema (``massact.report.schema.load_atlas`` reads it back)."""
    return schema.write_atlas(atlas) + "\n"


def _curves(atlas: Atlas, curve: Callable[[Row], list[float] | None], ylabel: str, title: str):
    """A figure of each model's per-block ``curve`` by relative depth (0 the first block, 1 the last), the models
    without one left out; the caller adds what is its own and finishes it with ``_finished``."""
    fig, ax = _figure()
    for row in atlas.rows:
        values = curve(row)
        if values is not None:
            ax.plot([depth(layer, len(values)) for layer in range(len(values))], values, "-o", markersize=3, label=row.model)
    ax.set_xlabel("relative depth (block / last block)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def _finished(fig, ax) -> bytes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def ratio_figure(atlas: Atlas) -> bytes:
    """Per block, top1 / median |a| by relative depth, every model overlaid."""
    fig, ax = _curves(atlas, lambda row: [v if v == v and v > 0 else np.nan for v in row.ratios], "top1 / median |a|",
                      "Largest |a| over the median |a|, per block, every model")
    ratio_line = atlas.settings.get("min_ratio")
    if ratio_line:
        ax.axhline(ratio_line, color="crimson", alpha=0.4, linewidth=4, label=f"massive: {ratio_line:g}x the median")
    ax.set_yscale("log")
    return _finished(fig, ax)


def sink_figure(atlas: Atlas) -> bytes:
    """Per block, the sink rate by relative depth, every model whose sink was measured (gaps: no softmax attention)."""
    fig, ax = _curves(atlas, lambda row: row.sink_rates, "sink rate", "Attention sink rate per block, every model whose sink was measured")
    ax.set_ylim(0, 1)
    return _finished(fig, ax)


def entropy_figure(atlas: Atlas) -> bytes:
    """Per block, the normalized entropy of the token representations by relative depth, every model whose report
    measured it."""
    fig, ax = _curves(atlas, lambda row: row.entropies, "matrix entropy / log(tokens)",
                      "The entropy of the token representations per block (the compression valley), every model")
    ax.set_ylim(-0.05, 1.05)
    return _finished(fig, ax)


def qk_figure(atlas: Atlas) -> bytes:
    """Per block, the largest max/mean L2 norm of a query or key dim by relative depth, every model with a Q/K section
    (gaps: blocks not measured)."""
    fig, ax = _curves(atlas, lambda row: row.qk_ratios, "largest max/mean of a Q/K dim",
                      "Q/K concentration per block, every model with a Q/K section")
    ax.axhline(QK_THRESHOLD, color="grey", linestyle="--", linewidth=1)  # the massive threshold
    return _finished(fig, ax)


ATLAS_FIGURES = {
    "atlas_ratio.png": (ratio_figure, lambda a: bool(a.rows), "top1 / median |a| per block by relative depth, every model"),
    "atlas_sink.png": (sink_figure, lambda a: any(r.sink_rates is not None for r in a.rows),
                       "the sink rate per block by relative depth, every model whose sink was measured"),
    "atlas_entropy.png": (entropy_figure, lambda a: any(r.entropies is not None for r in a.rows),
                          "the entropy of the token representations per block by relative depth, every model that measured it"),
    "atlas_qk.png": (qk_figure, lambda a: any(r.qk_ratios is not None for r in a.rows),
                     "the largest max/mean L2 norm of a query or key dim per block by relative depth (dashed: the massive threshold)"),
}


def figures(atlas: Atlas) -> dict[str, bytes]:
    return {name: draw(atlas) for name, (draw, wanted, _) in ATLAS_FIGURES.items() if wanted(atlas)}


# The columns shown under a sentence beside the model: what the rules read.
_BACKING = ("family", "mixers", "norms", "positions", "residual streams", "massive dims (tokens)", "top / median", "birth block",
            "birth depth", "sink rate", "has a sink", "sink survives zeroing", "valley block", "valley - birth",
            "entropy drop into the valley", "entropy drop, massive tokens left out")


def _table(rows: list[Row], names: tuple[str, ...]) -> str:
    picked = [(name, value) for name, value in COLUMNS if name in names]
    head_row = "".join(f"<th>{html.escape(name)}</th>" for name, _ in picked)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_page_cell(value(row)))}</td>" for _, value in picked) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="data"><tr>{head_row}</tr>{body}</table></div>'


def to_html(atlas: Atlas, pngs: dict[str, bytes]) -> str:
    """One page: the sentences, each with the rows it rests on, then every row, then the curves."""
    title = f"massact atlas: {len(atlas.rows)} model{'s' if len(atlas.rows) != 1 else ''}"
    by_model = {row.model: row for row in atlas.rows}
    backing = ("model", *_BACKING)
    said = "".join(f"<section><p>{html.escape(s.text)}</p>{_table([by_model[m] for m in s.rows], backing)}</section>"
                   for s in atlas.sentences) or "<p>The rows support no sentence across models.</p>"
    settings = ", ".join(f"{key} {value}" for key, value in atlas.settings.items() if value is not None)
    shown = [figure(name[:-4], name, pngs[name], caption) for name, (_, _, caption) in ATLAS_FIGURES.items() if name in pngs]
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in atlas.warnings)
    return f"""{head(title)}<body><main>
<h1>{html.escape(title)}</h1>
<p>Every model scanned with the same texts and settings: {html.escape(settings)}</p>
<section><h2>What the rows say</h2>{said}</section>
<section><h2>Every model</h2><p>An empty cell (-): the report has no such number (not verified, streamed, a dense model,
nothing massive).</p>{_table(atlas.rows, tuple(name for name, _ in COLUMNS))}</section>
<section><h2>Curves by relative depth</h2>{''.join(shown) or '<p>No figures.</p>'}</section>
{f'<section><h2>Warnings</h2><ul>{warnings}</ul></section>' if warnings else ''}
</main></body></html>
"""


def write_atlas(atlas: Atlas, out: Path, formats: set[str]) -> list[Path]:
    """atlas.json, atlas.csv, atlas.html and the curves in ``out`` (beside the models' report folders); the CSV is the
    atlas's text, written with the JSON or the text."""
    pngs = figures(atlas) if formats & {"html", "png"} else {}
    contents: dict[str, str | bytes] = {}
    if "json" in formats:
        contents["atlas.json"] = to_json(atlas)
    if formats & {"json", "txt"}:
        contents["atlas.csv"] = to_csv(atlas)
    if "html" in formats:
        contents["atlas.html"] = to_html(atlas, pngs)
    if "png" in formats:
        contents |= pngs
    return write_set(out, contents)
