"""Pure functions: one model's report as an atlas row. Every measured column is a field of the report, taken as it
is; a column the report does not have (no verification, no mixture of experts, nothing massive) stays empty."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ...models.architecture import Architecture
from ..deploy.results import Precision
from ..detect.results import DimSummary, Findings
from ..function.results import AttentionSinks, CompressionValley, QkValues
from ..mechanism.results import Mechanism
from .results import AtlasDim, Row


def depth(layer: int, n_layers: int) -> float:
    """Block ``layer``'s relative depth: 0 at the first block, 1 at the last (0 for a model of one block)."""
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values (None where there is none: nothing measured)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def flat(rows: list[list[float]] | None) -> list[float]:
    return [value for row in rows or [] for value in row]


def row(model: str, architecture: Architecture, findings: Findings, mechanism: Mechanism, attention: AttentionSinks | None,
        precision: Precision | None, valley: CompressionValley | None = None, qk: QkValues | None = None,
        streamed: bool = False) -> Row:
    """The atlas row of ``model`` from its report's stages (``attention``: the causal stage's sinks, None without
    verification; ``valley``: the compression valley, None in a report without it; ``qk``: its Q/K section, None where
    it has none; ``streamed``: whether the report's scan read the weights block by block); the caller names its
    report folder."""
    layers = findings.layers
    peak = max(layers, key=lambda layer: abs(layer.top[0].value) if layer.top and math.isfinite(layer.top[0].value) else -1.0)
    top = abs(peak.top[0].value) if peak.top else 0.0
    found = Row(
        model=model, report="", architecture=architecture, streamed=streamed, verified=attention is not None,
        dims=[AtlasDim(dim=d.dim, value=d.max_value, born_at=d.born_at, tokens=list(d.tokens)) for d in findings.dims],
        top=top, top_block=peak.layer, median=peak.median, ratio=top / peak.median if peak.median > 0 else math.nan,
        headroom=None if precision is None else precision.headroom,
        super_experts=None if mechanism.super_experts is None else [[x.layer, x.expert] for x in mechanism.super_experts.found],
        ratios=[layer.ratio for layer in layers],
    )
    if findings.dims:
        _lead(found, max(findings.dims, key=lambda d: abs(d.max_value)), mechanism, len(layers))
    if attention is not None and attention.texts:
        _sinks(found, attention)
    if valley is not None:
        found.valley, found.valley_depth, found.valley_from_birth = valley.valley, valley.valley_depth, valley.from_birth
        found.valley_drop, found.valley_drop_without = valley.drop, valley.drop_without
        found.entropies = list(valley.entropy)
    if qk is not None:
        _qk(found, qk)
    return found


def _qk(found: Row, qk: QkValues) -> None:
    """The Q/K columns and curve: the head with the largest max/mean over every query and key head, its top dim's
    band, the share of heads with a massive dim, and the disruption test's perplexity ratios."""
    finite = lambda v: v if math.isfinite(v) else -1.0
    heads = [(block.layer, part, h) for block in qk.blocks for part in (block.queries, block.keys) if part is not None
             for h in range(len(part.ratio))]
    curve = [max((finite(r) for part in (b.queries, b.keys) if part is not None for r in part.ratio), default=-1.0) for b in qk.blocks]
    found.qk_ratios = [v if v >= 0 else math.nan for v in curve]
    if not heads:
        return
    _, part, head = max(heads, key=lambda lph: finite(lph[1].ratio[lph[2]]))
    found.qk_ratio = part.ratio[head]
    found.qk_band = (part.bands[head][0] or None) if part.bands and part.bands[head] else None
    found.qk_heads = sum(bool(part.dims[h]) for _, part, h in heads) / len(heads)
    if qk.disruption is not None:
        base = qk.disruption.base.perplexity
        found.qk_perplexity = qk.disruption.massive.perplexity / base
        found.qk_control = qk.disruption.control.perplexity / base


def _lead(found: Row, lead: DimSummary, mechanism: Mechanism, n_layers: int) -> None:
    """The lead dim's birth, writer, top neuron, super weight and erasure, from the mechanism at its birth block."""
    at_birth = lambda place: place.dim == lead.dim and place.layer == lead.born_at and place.role == "birth"
    found.lead, found.birth, found.birth_depth = lead.dim, lead.born_at, depth(lead.born_at, n_layers)
    origin = next((o for o in mechanism.origin if at_birth(o)), None)
    found.writer = None if origin is None else origin.writer
    dense = next((a for a in mechanism.attribution if at_birth(a)), None)
    routed = next((e for e in mechanism.experts if at_birth(e)), None)
    if dense is not None:
        weight = dense.super_weight
        found.super_weight, found.super_weight_value = f"{weight.matrix}[{weight.row}, {weight.col}]", weight.value
        if dense.neurons:
            found.neuron, found.neuron_share = dense.neurons[0].neuron, dense.neurons[0].share
    elif routed is not None:
        weight = routed.moe.super_weight
        found.super_weight, found.super_weight_value = f"{weight.matrix}[{', '.join(map(str, weight.index))}]", weight.value
        found.expert = routed.moe.top_expert
        if routed.moe.neurons:
            found.neuron, found.neuron_share = routed.moe.neurons[0].neuron, routed.moe.neurons[0].share
    lifeline = next((line for line in mechanism.lifelines if line.dim == lead.dim), None)
    found.erased_at = None if lifeline is None else list(lifeline.erased_at)


def _sinks(found: Row, attention: AttentionSinks) -> None:
    """The sink's columns (an attention pass that measured something: a softmax block and a sink token)."""
    found.sink_rate = attention.overall_rate
    found.has_sink, found.first_sink = bool(attention.sink_layers), attention.first_sink_layer
    found.sink_share = mean(flat(attention.share))
    found.sink_positions = sorted({token.position for token in attention.tokens})
    found.gate_sink, found.gate_other = mean(flat(attention.gate_sink)), mean(flat(attention.gate_other))
    found.learned_sink = mean(flat(attention.learned_sink))
    found.sink_rates = list(attention.rate)
    zero = next((change for change in attention.interventions if change.label == "zero"), None)
    if zero is not None and attention.birth_layer is not None:
        # The sink blocks the replacement can reach (after the birth), as the report's own dependence sentence counts them.
        reached = [layer for layer in attention.sink_layers if layer > attention.birth_layer]
        if reached:
            found.sink_reached = len(reached)
            found.sink_kept = sum(bool(zero.survives[layer]) for layer in reached)
            found.sink_survives = 2 * found.sink_kept >= found.sink_reached
