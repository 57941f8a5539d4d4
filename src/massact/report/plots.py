"""The report as figures (matplotlib, PNG). File names are stable; each figure is drawn only when its data exists.

Every figure is FIG_SIZE inches at DPI dots per inch, so every PNG is 1200 x 600 pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

from ..analysis.deploy.results import Quantization
from ..analysis.results import Report

FIG_SIZE = (12, 6)
DPI = 100
PIXELS = (FIG_SIZE[0] * DPI, FIG_SIZE[1] * DPI)


def _figure(ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=FIG_SIZE, dpi=DPI)
    return fig, axes


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    plt.close(fig)
    return buffer.getvalue()


def layer_profile(report: Report) -> bytes:
    """Top-1, top-2, top-3 and median |a| of every block's output, log scale, birth and removal blocks marked."""
    fig, ax = _figure()
    layers = [s.layer for s in report.findings.layers]
    for rank, style in enumerate(("-o", "--", ":")):
        values = [abs(s.top[rank].value) if len(s.top) > rank else np.nan for s in report.findings.layers]
        ax.plot(layers, values, style, label=f"top-{rank + 1} |a|")
    ax.plot(layers, report.medians, "-s", color="gray", label="median |a|")
    for d in report.findings.dims:
        ax.axvline(d.born_at, color="crimson", alpha=0.6)
        streams = f" ({', '.join(d.streams)})" if d.streams else ""  # hyper-connections: the streams it is massive in
        ax.annotate(f"dim {d.dim}{streams} born", (d.born_at, abs(d.max_value)), textcoords="offset points",
                    xytext=(4, 6), color="crimson", fontsize=9)
        for removed in d.removed_at:
            ax.axvline(removed, color="navy", alpha=0.5, linestyle="--")
            ax.annotate(f"dim {d.dim} falls back", (removed, abs(d.max_value) / 3), textcoords="offset points", xytext=(4, 0),
                        color="navy", fontsize=9)
    threshold = [report.findings.criterion.threshold(s.median) for s in report.findings.layers]
    ax.plot(layers, threshold, color="crimson", alpha=0.3, linewidth=6, label="massive threshold")
    ax.set_yscale("log")
    ax.set_xlabel("block (residual output)")
    ax.set_ylabel("|activation|")
    ax.set_title(f"{report.model.name}: largest activations per block")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def massive_heatmap(report: Report) -> bytes:
    """|a| over (token position, dim) at the birth block's output, in 3D as Sun et al. draw it (linear height, so
    the massive entries stand up as spikes), and as a log-scale heat map beside it; massive entries labelled."""
    state = report.mechanism.birth_state
    magnitude = np.array(state.magnitude)
    fig = plt.figure(figsize=FIG_SIZE, dpi=DPI)
    surface = fig.add_subplot(1, 2, 1, projection="3d")
    dims, positions = np.meshgrid(np.arange(magnitude.shape[1]), np.arange(magnitude.shape[0]))
    surface.plot_surface(dims, positions, magnitude, cmap="viridis", linewidth=0, rstride=1, cstride=1, antialiased=False)
    surface.set_xlabel("dim")
    surface.set_ylabel("token position")
    surface.set_zlabel("|a|")
    surface.set_title(f"Block {state.layer} output, text {state.text}")
    heat = fig.add_subplot(1, 2, 2)
    image = heat.imshow(np.maximum(magnitude, 1e-3), aspect="auto", interpolation="nearest", cmap="magma", norm=LogNorm())
    fig.colorbar(image, ax=heat, label="|activation| (log)")
    heat.set_yticks(range(len(state.tokens)), [repr(t) for t in state.tokens], fontsize=7)
    heat.set_xlabel("dim")
    for dim in state.dims:
        position = int(magnitude[:, dim].argmax())
        label = f"dim {dim}, {state.tokens[position]!r}: {magnitude[position, dim]:,.0f}"
        surface.text(dim, position, magnitude[position, dim], label, color="crimson", fontsize=8)
        heat.annotate(label, (dim, position), xytext=(-60, 25 + 15 * state.dims.index(dim)), textcoords="offset points",
                      color="cyan", fontsize=8, arrowprops=dict(arrowstyle="->", color="cyan"))
    fig.subplots_adjust(left=0.02, right=0.95, wspace=0.25)
    return png_bytes(fig)


def mlp_anatomy(report: Report) -> bytes:
    """Max and median |v| at each MLP checkpoint (log), top1/median on a second axis, the explosion point marked."""
    anatomy = next(a for a in report.mechanism.anatomy if a.role == "birth")
    points = anatomy.checkpoints
    fig, ax = _figure()
    x = np.arange(len(points))
    ax.bar(x - 0.2, [p.max for p in points], width=0.4, label="max |v|", color="tab:red")
    ax.bar(x + 0.2, [p.median for p in points], width=0.4, label="median |v|", color="tab:gray")
    ax.set_yscale("log")
    ax.set_xticks(x, [p.name for p in points])
    ax.set_ylabel("|v|")
    ratio_axis = ax.twinx()
    ratio_axis.plot(x, [p.ratio for p in points], "-o", color="tab:blue", label="top1 / median")
    ratio_axis.set_yscale("log")
    ratio_axis.set_ylabel("top1 / median", color="tab:blue")
    explosion = [p.name for p in points].index(anatomy.explosion_point)
    ax.axvspan(explosion - 0.5, explosion + 0.5, color="gold", alpha=0.25, label="explosion point")
    ax.set_title(f"Block {anatomy.layer} MLP at token {anatomy.position} ({anatomy.token!r}): explosion at {anatomy.explosion_point}")
    ax.legend(loc="upper left")
    ratio_axis.legend(loc="upper center")
    return png_bytes(fig)


def attribution_waterfall(report: Report, shown: int = 8) -> bytes:
    """The top neuron contributions stacked up to the massive output, the rest and the bias grouped."""
    a = max((a for a in report.mechanism.attribution if a.role == "birth"), key=lambda a: abs(a.output))
    neurons = a.neurons[:shown]
    rest = a.output - a.bias - sum(n.contribution for n in neurons)
    labels = [f"neuron {n.neuron}" for n in neurons] + ["all other neurons", "bias"]
    steps = [n.contribution for n in neurons] + [rest, a.bias]
    fig, ax = _figure()
    start = 0.0
    for index, step in enumerate(steps):
        ax.bar(index, step, bottom=start, color="tab:green" if step >= 0 else "tab:red")
        start += step
    ax.bar(len(steps), a.output, color="tab:blue")
    ax.set_xticks(range(len(steps) + 1), labels + [f"mlp_out[{a.dim}]"], rotation=30, ha="right")
    w = a.super_weight
    ax.annotate(f"super weight {w.matrix.rsplit('.', 2)[-2]}[{w.row}, {w.col}] = {w.value:+.3f}\n(rank {w.rank} of {w.entries:,})",
                (0, neurons[0].contribution), xytext=(40, -10), textcoords="offset points", fontsize=9,
                arrowprops=dict(arrowstyle="->"))
    ax.set_ylabel("contribution to the output")
    ax.set_title(f"Block {a.layer} mlp_out[{a.dim}] = {a.output:,.1f}: activation x weight per neuron")
    fig.subplots_adjust(bottom=0.22)
    return png_bytes(fig)


def verification(report: Report) -> bytes:
    """Perplexity ratio and the massive value under each intervention (log scales)."""
    rows = [r for r in report.causal.verification.interventions if r.perplexity is not None]
    fig, (left, right) = _figure(2)
    names = [f"dim {r.dim}: {r.name}"[:60] for r in rows]
    y = np.arange(len(rows))
    left.barh(y, [r.perplexity_ratio for r in rows], color=["tab:red" if r.perplexity_ratio > 2 else "tab:gray" for r in rows])
    # No log axis without one positive finite ratio (a model whose perplexity is inf or nan): matplotlib would refuse it.
    if any(0 < r.perplexity_ratio < float("inf") for r in rows):
        left.set_xscale("log")
    left.set_yticks(y, names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("perplexity / unmodified")
    left.axvline(1, color="black", linewidth=0.8)
    values = [abs(r.value_birth) if r.value_birth == r.value_birth else np.nan for r in rows]
    right.barh(y, np.maximum(np.nan_to_num(values, nan=0.0), 1e-3), color=["tab:orange" if r.still_massive else "tab:blue" for r in rows])
    right.set_xscale("log")
    right.set_yticks(y, [""] * len(rows))
    right.invert_yaxis()
    right.set_xlabel("|massive value| at the birth block (orange: still massive)")
    fig.suptitle(f"Interventions: baseline perplexity {report.causal.verification.baseline_perplexity:.2f}")
    fig.subplots_adjust(left=0.3, wspace=0.05)
    return png_bytes(fig)


def median_over_heads(rows: list[list[float | None]]) -> np.ndarray:
    """Per block, the median over heads of a per-head number, NaN (no point: matplotlib leaves a gap) for a block none
    of whose heads has one: a convolution or linear-attention block of a hybrid has no softmax heads. NaN and None
    heads (a head with nothing to measure) are left out of the median."""
    out = np.full(len(rows), np.nan)
    for block, row in enumerate(rows):
        heads = np.array([np.nan if v is None else v for v in row], dtype=float)
        heads = heads[~np.isnan(heads)]
        if heads.size:  # the median of no heads is not 0: the block keeps its NaN
            out[block] = np.median(heads)
    return out


def attention_sinks(report: Report) -> bytes:
    """Left: attention on the sink tokens per block and head. Right: per block the sink rate (unmodified and under
    each replacement of the massive values) and the sink tokens' value-norm ratio (median over heads, log axis);
    the birth block marked on both."""
    a = report.causal.attention
    fig, (left, right) = _figure(2)
    share = np.array(a.share, dtype=float).T  # heads x blocks
    image = left.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=left, label="attention on the sink tokens")
    left.set_xlabel("block")
    left.set_ylabel("head")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    uniform = np.array(a.uniform, dtype=float)
    uniform = uniform[~np.isnan(uniform)]  # the blocks without softmax heads have no uniform share
    left.set_title("Attention on the sink tokens" + (f" (uniform would give {float(uniform.mean()):.0%})" if uniform.size else ""))
    blocks = np.arange(len(a.share))
    # Markers on every line: a hybrid's softmax blocks may stand apart (NaN between them), where a bare line draws nothing.
    if a.rate:
        right.plot(blocks, a.rate, "-o", color="tab:purple", label=f"sink rate (> {a.epsilon:g})")
    for change, style, color in zip(a.interventions, ("--v", ":^"), ("tab:blue", "tab:green")):
        right.plot(blocks, change.rate, style, color=color, label=f"sink rate, massive values set to {change.label}")
    right.set_xlim(-0.5, len(blocks) - 0.5)  # the blocks of the heat map beside it, those without attention included
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("block")
    right.set_ylabel("share of heads that are sink heads")
    if a.value_ratio:
        values = right.twinx()
        values.plot(blocks, median_over_heads(a.value_ratio), "-s", color="tab:orange", label="value norm: sink / median other")
        values.set_yscale("log")
        values.set_ylabel("value-norm ratio (median over heads)", color="tab:orange")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if a.birth_layer is not None:
            axis.axvline(a.birth_layer, color="crimson", linewidth=2, label=f"birth block {a.birth_layer}")
    # One legend for both y axes, below the plot: inside it, it covered the lines it names.
    handles = [h for axis in fig.axes if axis is not left for h in axis.get_legend_handles_labels()[0]]
    right.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    right.set_title("Sink rate and the sink's value norm per block")
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.27, wspace=0.3)
    return png_bytes(fig)


def valley(report: Report) -> bytes:
    """Per block, the entropy of the token representations with and without the massive tokens (left axis) and the
    first token's share of the norm (right axis); the valley and the birth block marked."""
    v = report.valley
    fig, ax = _figure()
    blocks = np.arange(len(v.entropy))
    ax.plot(blocks, v.entropy, "-o", color="tab:blue", label="entropy, every token")
    ax.plot(blocks, v.entropy_without, "--s", color="tab:green", label="entropy, without the massive tokens")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("block (output)")
    ax.set_ylabel("matrix entropy / log(tokens)")
    share = ax.twinx()
    share.plot(blocks, v.first_share, ":^", color="tab:orange", label="first token's share of ||X||^2")
    share.set_ylim(-0.05, 1.05)
    share.set_ylabel("first token's share of the squared norm", color="tab:orange")
    if v.valley is not None:
        ax.axvline(v.valley, color="tab:blue", alpha=0.4, linewidth=6, label=f"valley: block {v.valley}")
    if v.birth is not None:
        ax.axvline(v.birth, color="crimson", linewidth=2, label=f"birth block {v.birth}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [h for axis in (ax, share) for h in axis.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"{report.model.name}: the compression valley ({len(v.texts)} texts)")
    fig.subplots_adjust(bottom=0.22)
    return png_bytes(fig)


_PHASE_COLOURS = {"precursor": "#fde0c5", "precursor erasure": "#d9e8fb", "birth": "#f4a6a6", "growth": "#f9c7a8",
                  "hold": "#eeeeee", "erasure": "#a9c8f0", "reversal": "#c9a9f0", "after": "#f7f7f7"}


def lifeline(report: Report) -> bytes:
    """The strongest dim's life at its main carrier: per block the attention and MLP contributions as they land (bars),
    the value after the block (line), the phases shaded; symmetric log scale, so the precursor shows beside the peak."""
    line = max(report.mechanism.lifelines, key=lambda x: abs(x.peak))
    fig, ax = _figure()
    layers = np.array([s.layer for s in line.steps])
    ax.bar(layers - 0.2, [s.attn for s in line.steps], width=0.4, color="tab:purple", label="attention (as it lands)")
    ax.bar(layers + 0.2, [s.mlp for s in line.steps], width=0.4, color="tab:green", label="MLP (as it lands)")
    if any(s.norm is not None for s in line.steps):
        ax.plot(layers, [s.norm for s in line.steps], "x", color="tab:brown", label="first LayerNorm's step")
    if any(s.mix is not None for s in line.steps):
        ax.plot(layers, [s.mix for s in line.steps], "+", color="tab:orange", label="stream mixing's change")
    stream = f" (stream {line.stream})" if line.stream else ""
    ax.plot(layers, [s.value for s in line.steps], "-o", color="black", markersize=3, label=f"dim {line.dim}{stream} after the block")
    ax.set_yscale("symlog", linthresh=max(1.0, abs(line.peak) / 1e4))
    bottom = ax.get_ylim()[0]
    for p in line.phases:  # names along the bottom, clear of the value line
        ax.axvspan(p.first - 0.5, p.last + 0.5, color=_PHASE_COLOURS[p.name], alpha=0.6, zorder=0)
        ax.text((p.first + p.last) / 2, bottom, p.name, ha="center", va="bottom", fontsize=8, rotation=90 if p.last - p.first < 2 else 0)
    for removed in line.removed_at:
        ax.axvline(removed - 0.5, color="navy", linestyle="--", linewidth=1)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("block (dashed: where the scan stops calling it massive)")
    ax.set_ylabel("contribution to the dim (symlog)")
    ax.set_title(f"Lifeline of dim {line.dim}{stream} at text {line.text} pos {line.position} {line.token!r}: peak {line.peak:+,.0f} "
                 f"at block {line.peak_layer}")
    ax.legend(loc="upper left", fontsize=8)
    return png_bytes(fig)


def trigger(report: Report, shown: int = 10) -> bytes:
    """Why the first writing neuron fires at the massive position: each source's part of its pre-activation there
    against its mean (bar) and largest value (tick) at the other positions."""
    t = max((t for t in report.trigger if t.neurons), key=lambda t: abs(next(x.peak for x in report.mechanism.lifelines if x.dim == t.dim)))
    n = t.neurons[0]
    split = n.splits[0]
    sources = split.sources[:shown][::-1]
    fig, ax = _figure()
    y = np.arange(len(sources))
    ax.barh(y + 0.2, [s.here for s in sources], height=0.4, color="tab:red", label=f"at {t.token!r} (pos {t.position})")
    ax.barh(y - 0.2, [s.others_mean for s in sources], height=0.4, color="tab:gray", label="other positions: mean")
    ax.plot([s.others_max for s in sources], y - 0.2, "|", color="black", markersize=12, label="other positions: max")
    ax.set_yticks(y, [s.source for s in sources], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    name = "gate" if split.site == "mlp_gate" else "pre-activation"
    ax.set_xlabel(f"part of the {name} (sources sum to it exactly)")
    ax.set_title(f"Block {n.layer} neuron {n.neuron} {name}: {split.value:+.1f} at pos {t.position}, {split.others_mean:+.1f} "
                 "elsewhere on average")
    ax.legend(loc="lower right", fontsize=8)
    fig.subplots_adjust(left=0.2)
    return png_bytes(fig)


def quantization_figure(q: Quantization) -> bytes:
    """Per setting: perplexity over the float model (log) and how much of the massive value survives at its peak block."""
    fig, (left, right) = _figure(2)
    names = [f"{r.setting}, {r.variant}"[:58] for r in q.rows]
    y = np.arange(len(q.rows))
    ratios = [r.perplexity_ratio if np.isfinite(r.perplexity_ratio) else np.nan for r in q.rows]
    left.barh(y, np.nan_to_num(ratios, nan=max(np.nanmax(ratios), 1.0) if not np.all(np.isnan(ratios)) else 1.0),
              color=["tab:red" if not (r <= 1.5) else "tab:gray" for r in ratios])
    left.set_xscale("log")
    left.set_yticks(y, names, fontsize=7)
    left.invert_yaxis()
    left.axvline(1, color="black", linewidth=0.8)
    left.set_xlabel("perplexity / float (red: above 1.5)")
    right.barh(y, [r.kept_peak for r in q.rows], color=["tab:orange" if abs(r.kept_peak - 1) > 0.1 else "tab:blue" for r in q.rows])
    right.axvline(1, color="black", linewidth=0.8)
    right.set_yticks(y, [""] * len(q.rows))
    right.invert_yaxis()
    right.set_xlabel(f"massive value at block {q.peak_layer} / float (orange: off by more than 10%)")
    fig.suptitle(f"Quantization: dim {q.dim}, float perplexity {q.baseline_perplexity:.2f}")
    fig.subplots_adjust(left=0.3, wspace=0.05)
    return png_bytes(fig)


def super_experts(report: Report) -> bytes:
    """Each (block, expert)'s largest |output| over the corpus (log colour), the super experts ringed."""
    s = report.mechanism.super_experts
    profile = np.array([[np.nan if v is None else v for v in row] for row in s.profile], dtype=float)
    fig, ax = _figure()
    shown = np.where(profile > 0, profile, np.nan)
    finite = shown[np.isfinite(shown)]
    image = ax.imshow(shown.T, aspect="auto", origin="lower", cmap="viridis",
                      norm=LogNorm(vmin=finite.min(), vmax=finite.max()) if len(finite) else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="largest |expert output| over the corpus")
    for x in s.found:
        ax.scatter([x.layer], [x.expert], s=220, facecolors="none", edgecolors="red", linewidths=2)
    ax.set_xlabel("block")
    ax.set_ylabel("expert")
    ax.set_title(f"Expert output maxima; super experts ringed ({len(s.found)}: above {s.rule.threshold:,.0f})")
    return png_bytes(fig)


FIGURES: dict[str, tuple[Callable[[Report], bytes], Callable[[Report], bool], str]] = {
    "layer_profile.png": (layer_profile, lambda r: bool(r.findings.layers), "Layer profile: top-1..3 and median |activation| per block"),
    "massive_heatmap.png": (massive_heatmap, lambda r: r.mechanism.birth_state is not None,
                            "The birth block's output over tokens and dims"),
    "lifeline.png": (lifeline, lambda r: bool(r.mechanism.lifelines),
                     "Lifeline: each block's attention and MLP contributions to the strongest dim"),
    "mlp_anatomy.png": (mlp_anatomy, lambda r: any(a.role == "birth" for a in r.mechanism.anatomy), "MLP checkpoints at the writing block"),
    "attribution.png": (attribution_waterfall, lambda r: any(a.role == "birth" for a in r.mechanism.attribution),
                        "Neuron contributions to the massive value"),
    "trigger.png": (trigger, lambda r: any(t.neurons for t in r.trigger),
                    "Trigger: the writing neuron's sources at the massive position and elsewhere"),
    "verification.png": (verification, lambda r: r.causal.verification is not None, "Perplexity and massive value under each intervention"),
    "super_experts.png": (super_experts, lambda r: r.mechanism.super_experts is not None,
                          "Super experts: each expert's largest |output| per block"),
    "attention_sinks.png": (attention_sinks, lambda r: r.causal.attention is not None and bool(r.causal.attention.share),
                            "Attention on the sink tokens (block x head), the sink rate and value-norm ratio per block"),
    "valley.png": (valley, lambda r: r.valley is not None and r.valley.valley is not None,
                   "The compression valley: the entropy of the token representations per block, with and without the massive "
                   "tokens, and the first token's share of the norm"),
    "quantization.png": (lambda r: quantization_figure(r.deploy.quantization),
                         lambda r: r.deploy.quantization is not None and bool(r.deploy.quantization.rows),
                         "Perplexity and the massive value under each quantization setting"),
}


def figures(report: Report) -> dict[str, bytes]:
    """{file name: PNG bytes} for every figure whose data the report has."""
    return {name: draw(report) for name, (draw, available, _) in FIGURES.items() if available(report)}
