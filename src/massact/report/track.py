"""A track as files: track.json, track.txt (also printed), track.html and its figures (track_*.png)."""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.text import Text

from ..analysis.track.results import Track
from . import schema
from .atomic import write_set
from .html import figure, head
from .plots import _figure, png_bytes
from .tables import Style, add_row, num, ratio


def renderables(track: Track, plain: bool) -> list:
    """Every section of the track, in reading order."""
    style = Style(plain)
    points = track.checkpoints
    out: list = [
        Text(f"massact track: {len(points)} {'checkpoint(s)' if track.settings.get('monitor') is None else 'monitor record(s)'}, "
             f"{points[0].label} to {points[-1].label}", style="" if plain else "bold"),
        Text("Every checkpoint scanned with the same texts and settings: "
             + ", ".join(f"{key} {value}" for key, value in track.settings.items() if value is not None)),
    ]
    out += [style.heading("Events, in order")]
    out += [Text("\n".join(f"- {event}" for event in track.events) or "Nothing massive at any checkpoint.")]
    out += [style.heading("Timeline"), _timeline(style, track)]
    if track.dims:
        out += [style.heading("Massive dims across the checkpoints"), _dims_table(style, track)]
        out += [style.heading("Birth, writer, neurons and super weight per checkpoint"), _writers_table(style, track)]
    if track.moves:
        table = style.table(None, "from", "to", "dim before", "dim after", "shared")
        for move in track.moves:
            add_row(table, move.label_before, move.label_after, str(move.before), str(move.after), move.shared)
        out += [style.heading("Role moves: the dim changes, the writer stays"), table]
    if track.diff is not None:
        out += [style.heading(f"Diff: {track.diff.before} -> {track.diff.after}"), *_diff(style, track)]
    if track.warnings:
        out += [style.heading("Warnings"), Text("\n".join(f"- {w}" for w in track.warnings))]
    return out


def _timeline(style: Style, track: Track):
    table = style.table(None, "checkpoint", "massive dims (value, ratio, birth block)", "largest top1/median: block, dim",
                        "top1", "median", "sink rate", "first sink block", "float16 headroom", right=(3, 4, 5, 6, 7))
    for point in track.checkpoints:
        dims = "; ".join(f"{d.dim} ({num(d.value, True)}, {ratio(d.ratio)}, {d.born_at})" for d in point.dims) or "none"
        best = max(point.blocks, key=lambda b: b.ratio if b.ratio == b.ratio else -1.0, default=None)
        peak = ("-", "-", "-") if best is None else (f"{ratio(best.ratio)}: {best.layer}, {best.top_dim}", num(best.top1), num(best.median))
        add_row(table, point.label, dims, *peak, "-" if point.sink_rate is None else f"{point.sink_rate:.0%}",
                "-" if point.first_sink_layer is None else str(point.first_sink_layer),
                "-" if point.headroom is None else f"{point.headroom:,.1f}x")
    return table


def _dims_table(style: Style, track: Track):
    table = style.table(None, "dim", "emerged at", *(p.label for p in track.checkpoints), right=tuple(range(2, 2 + len(track.checkpoints))))
    for dim in track.dims:
        add_row(table, str(dim.dim), "never" if dim.emerged_at is None else str(dim.emerged_at),
                *(num(value) + ("*" if born is not None else "") for value, born in zip(dim.values, dim.born_at)))
    return Group(table, Text("|a| per checkpoint, * where massive; - where the report lists no entry of the dim."))


def _writers_table(style: Style, track: Track):
    table = style.table(None, "checkpoint", "dim", "birth", "writer", "top neurons", "super weight", "value", "rank", "lifeline phases",
                        right=(2, 6, 7))
    for point in track.checkpoints:
        for d in point.dims:
            w = d.super_weight
            add_row(table, point.label, str(d.dim), str(d.born_at), d.writer or "-", ", ".join(map(str, d.neurons)) or "-",
                    "-" if w is None else f"{w.matrix} [{w.row}, {w.col}]", "-" if w is None else num(w.value, True),
                    "-" if w is None else str(w.rank), "; ".join(d.phases) or "-")
    return table


def _diff(style: Style, track: Track) -> list:
    d = track.diff
    lines = [f"{'No change' if d.unchanged else 'Changed'}: massive dims that persist {d.persist or 'none'}, appear "
             f"{d.appear or 'none'}, vanish {d.vanish or 'none'}. Sink: {d.sink}."]
    table = style.table(None, "dim", "super weight", "before", "after", "change", "matrix mean |change|", "change / mean",
                        right=(2, 3, 4, 5, 6))
    for w in d.weights:
        add_row(table, str(w.dim), f"{w.matrix} [{w.row}, {w.col}]", num(w.before, True), num(w.after, True), num(w.change, True),
                num(w.matrix_mean_change), "-" if w.relative is None else f"{w.relative:,.1f}x")
    return [Text("\n".join(lines)), table] if d.weights else [Text("\n".join(lines))]


def to_text(track: Track, width: int = 140) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, no_color=True, highlight=False)
    console.print(Group(*renderables(track, plain=True)))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def to_json(track: Track) -> str:
    """track.json's text, written by the schema (``massact.report.schema.load_track`` reads it back)."""
    return schema.write_track(track) + "\n"


def _axis(track: Track) -> tuple[list[float], list[str], str]:
    """The x positions: the steps where every checkpoint has one, else 0, 1, 2 ... labelled by spec."""
    points = track.checkpoints
    if all(p.step is not None for p in points):
        return [float(p.step) for p in points], [], "training step"
    return list(map(float, range(len(points)))), [p.label for p in points], "checkpoint"


def _xaxis(ax, track: Track) -> list[float]:
    x, labels, name = _axis(track)
    if labels:
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(name)
    return x


def values_figure(track: Track) -> bytes:
    """Each massive dim's largest |a| over the checkpoints, log scale; filled markers where it is massive."""
    fig, ax = _figure()
    x = _xaxis(ax, track)
    for dim in track.dims:
        values = [np.nan if v is None else v for v in dim.values]
        line, = ax.plot(x, values, "-", label=f"dim {dim.dim}")
        massive = [v if born is not None else np.nan for v, born in zip(values, dim.born_at)]
        ax.plot(x, massive, "o", color=line.get_color())
    ax.set_yscale("log")
    ax.set_ylabel("largest |a| of the dim (any block)")
    ax.set_title("Massive dims over the checkpoints (dots: massive there)")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def birth_figure(track: Track) -> bytes:
    """The birth block of each massive dim at each checkpoint."""
    fig, ax = _figure()
    x = _xaxis(ax, track)
    for dim in track.dims:
        ax.plot(x, [np.nan if b is None else b for b in dim.born_at], "-o", label=f"dim {dim.dim}")
    ax.set_ylabel("birth block")
    ax.set_ylim(-0.5, max(len(track.checkpoints[0].blocks) - 0.5, 0.5))
    ax.set_title("Where each massive dim is born")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def ratio_figure(track: Track) -> bytes:
    """Block x checkpoint heat map of top1 / median |a| (log colour scale)."""
    from matplotlib.colors import LogNorm

    fig, ax = _figure()
    grid = np.array([[b.ratio if b.ratio == b.ratio and b.ratio > 0 else np.nan for b in p.blocks] for p in track.checkpoints]).T
    norm = LogNorm(vmin=max(np.nanmin(grid), 1e-3), vmax=max(np.nanmax(grid), 1.0))
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", norm=norm)
    fig.colorbar(image, ax=ax, label="top1 / median |a|")
    ax.set_xticks(range(len(track.checkpoints)), [p.label for p in track.checkpoints], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("block")
    ax.set_title("Largest |a| over the median, per block and checkpoint")
    return png_bytes(fig)


def blocks_figure(track: Track) -> bytes:
    """Per block, top1 / median |a| over the checkpoints (log scale), against the criterion's min_ratio: the
    trajectory toward (or away from) massive."""
    fig, ax = _figure()
    x = _xaxis(ax, track)
    for layer in range(len(track.checkpoints[0].blocks)):
        ax.plot(x, [p.blocks[layer].ratio if layer < len(p.blocks) else np.nan for p in track.checkpoints], "-", label=f"block {layer}")
    ratio_line = track.settings.get("min_ratio")
    if ratio_line:
        ax.axhline(ratio_line, color="crimson", alpha=0.4, linewidth=4, label=f"massive: {ratio_line:g}x the median")
    ax.set_yscale("log")
    ax.set_ylabel("top1 / median |a|")
    ax.set_title("Largest |a| over the median |a|, per block")
    ax.legend(fontsize=8, ncol=2)
    return png_bytes(fig)


def super_weight_figure(track: Track) -> bytes:
    """The super weight of each dim at each checkpoint: its value and its rank in the matrix."""
    fig, (left, right) = _figure(2)
    for ax in (left, right):
        x = _xaxis(ax, track)
    for dim in track.dims:
        weights = [next((d.super_weight for d in p.dims if d.dim == dim.dim), None) for p in track.checkpoints]
        left.plot(x, [np.nan if w is None else w.value for w in weights], "-o", label=f"dim {dim.dim}")
        right.plot(x, [np.nan if w is None else w.rank for w in weights], "-o", label=f"dim {dim.dim}")
    left.set_ylabel("super weight (as stored)")
    right.set_ylabel("rank by |w| in its matrix (1 = largest)")
    right.set_yscale("log")
    right.invert_yaxis()
    left.legend(fontsize=8)
    fig.suptitle("The super weight over the checkpoints")
    return png_bytes(fig)


def sink_figure(track: Track) -> bytes:
    """The sink rate over the checkpoints (the share of text x head pairs with a sink head, over all blocks)."""
    fig, ax = _figure()
    x = _xaxis(ax, track)
    ax.plot(x, [np.nan if p.sink_rate is None else p.sink_rate for p in track.checkpoints], "-o")
    ax.set_ylim(0, 1)
    ax.set_ylabel("sink rate")
    ax.set_title("Attention sink over the checkpoints")
    return png_bytes(fig)


TRACK_FIGURES = {
    "track_values.png": (values_figure, lambda t: bool(t.dims), "each massive dim's largest |a| over the checkpoints"),
    "track_birth.png": (birth_figure, lambda t: bool(t.dims), "the birth block over the checkpoints"),
    "track_blocks.png": (blocks_figure, lambda t: bool(t.checkpoints[0].blocks), "top1 / median per block over the checkpoints"),
    "track_ratio.png": (ratio_figure, lambda t: bool(t.checkpoints[0].blocks), "top1 / median per block and checkpoint"),
    "track_super_weight.png": (super_weight_figure, lambda t: any(d.super_weight for p in t.checkpoints for d in p.dims),
                               "the super weight's value and rank over the checkpoints"),
    "track_sink.png": (sink_figure, lambda t: any(p.sink_rate is not None for p in t.checkpoints), "the sink rate over the checkpoints"),
}


def figures(track: Track) -> dict[str, bytes]:
    return {name: draw(track) for name, (draw, wanted, _) in TRACK_FIGURES.items() if wanted(track)}


def to_html(track: Track, pngs: dict[str, bytes]) -> str:
    """One page: the text's sections and every figure, embedded."""
    title = f"massact track: {track.checkpoints[0].label} to {track.checkpoints[-1].label}"
    shown = [figure(name[:-4], name, pngs[name], caption) for name, (_, _, caption) in TRACK_FIGURES.items() if name in pngs]
    sections = to_text(track).split("\n## ")
    body = "".join(f"<section><h2>{html.escape(s.splitlines()[0])}</h2>"
                   f"<pre>{html.escape(chr(10).join(s.splitlines()[1:]).strip())}</pre></section>"
                   for s in sections[1:])
    return f"""{head(title)}<body>
<h1>{html.escape(title)}</h1>
<pre>{html.escape(sections[0].strip())}</pre>
{body}
<section><h2>Figures</h2>{''.join(shown) or '<p>No figures.</p>'}</section>
</body></html>
"""


def write_track(track: Track, out: Path, formats: set[str]) -> list[Path]:
    """track.json, track.txt, track.html and the figures in ``out`` (beside the checkpoints' report folders)."""
    pngs = figures(track) if formats & {"html", "png"} else {}
    makers = {"json": ("track.json", lambda: to_json(track)), "txt": ("track.txt", lambda: to_text(track)),
              "html": ("track.html", lambda: to_html(track, pngs))}
    contents: dict[str, str | bytes] = {name: make() for kind, (name, make) in makers.items() if kind in formats}
    return write_set(out, {**contents, **(pngs if "png" in formats else {})})
