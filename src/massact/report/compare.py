"""Side by side: several saved reports (models or settings) in one page, layer profiles overlaid by depth."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..analysis.results import Report
from .atomic import write_set
from .html import head
from .plots import DPI, FIG_SIZE, png_bytes
from .schema import load_report


def summary(report: Report) -> dict[str, str]:
    """One column of the comparison: what a reader compares across models, as text (nan where the report has null)."""
    model = report.model
    births = [o for o in report.mechanism.origin if o.role == "birth"]
    dims = ", ".join(f"{o.dim} (block {o.layer}, {o.writer.upper()})" for o in births) or "none"
    massive = report.findings.massive
    row = {
        "model": model.name,
        "architecture": f"{model.architecture}, {model.n_layers} blocks, d_model {model.d_model}, {model.dtype}",
        "massive dims (birth block, writer)": dims,
        "largest |a|": f"{max((abs(m.value) for m in massive), default=0):,.1f}",
        "largest |a| / median": f"{max((m.ratio for m in massive), default=0):,.0f}x",
        "removed at": ", ".join(f"{d.dim}: {d.removed_at or 'never'}" for d in report.findings.dims) or "-",
    }
    attribution = [a for a in report.mechanism.attribution if a.role == "birth"]
    if attribution:
        a = max(attribution, key=lambda a: abs(a.output) if a.output == a.output else -1.0)
        weight = a.super_weight
        if a.neurons:
            top = a.neurons[0]
            row["top neuron share"] = f"neuron {top.neuron}: {top.share:.1%} of dim {a.dim}; {a.neurons_for_90pct} for 90%"
        row["super weight"] = f"{weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f} (rank {weight.rank})"
    verification = report.causal.verification
    if verification:
        rows = verification.interventions
        ablation = [r for r in rows if r.confirms is not None and r.name.startswith("ablate top")]
        row["ablating the top neurons"] = ", ".join(f"dim {r.dim}: {'removes it' if r.confirms else 'does not remove it'}"
                                                    for r in ablation) or "-"
        for label in ("super weight", "to zero", "to mean"):
            hits = [r for r in rows if label in r.name and not r.name.startswith("control")]
            row[f"perplexity x, {label}"] = ", ".join(f"{_number(r.perplexity_ratio):,.2f}" for r in hits) or "-"
        row["baseline perplexity"] = f"{verification.baseline_perplexity:.2f}"
    return row


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def profiles(reports: list[Report], labels: list[str]) -> bytes:
    """top1/median per block for every report, blocks scaled to depth 0..1 so models of any size overlay."""
    fig, ax = plt.subplots(figsize=FIG_SIZE, dpi=DPI)
    for report, label in zip(reports, labels):
        layers = report.findings.layers
        depth = np.linspace(0, 1, len(layers)) if len(layers) > 1 else np.zeros(1)
        ratio = [abs(s.top[0].value) / s.median if s.top and s.median else np.nan for s in layers]
        ax.plot(depth, ratio, "-o", markersize=3, label=label)
    ax.axhline(reports[-1].findings.criterion.min_ratio, color="crimson", alpha=0.4, linewidth=4, label="massive ratio")
    ax.set_yscale("log")
    ax.set_xlabel("depth (block / last block)")
    ax.set_ylabel("top-1 |a| / median |a|")
    ax.set_title("Layer profiles, overlaid by depth")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def write_compare(directories: list[Path], out: Path) -> list[Path]:
    reports = [load_report(d) for d in directories]  # every field checked while it is built
    columns = [summary(r) for r in reports]
    keys = list(dict.fromkeys(key for column in columns for key in column))
    head_row = "".join(f"<th>{html.escape(c['model'])}<br><small>{html.escape(str(d))}</small></th>" for c, d in zip(columns, directories))
    body = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(c.get(k, '-'))}</td>" for c in columns) + "</tr>" for k in keys
    )
    png = profiles(reports, [f"{r.model.name} ({d.name})" for r, d in zip(reports, directories)])
    page = f"""{head(f"massact comparison of {len(reports)} reports")}<body><main>
<h1>massact comparison of {len(reports)} reports</h1>
<div class="scroll"><table class="data"><tr><th></th>{head_row}</tr>{body}</table></div>
<figure><img src="data:image/png;base64,{base64.b64encode(png).decode('ascii')}" alt="layer profiles overlaid by depth">
<figcaption>Layer profiles, overlaid by depth (compare_profiles.png)</figcaption></figure>
</main></body></html>
"""
    return write_set(out, {"compare.html": page, "compare_profiles.png": png})
