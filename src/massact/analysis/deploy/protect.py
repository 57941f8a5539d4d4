"""protect.json: the coordinates a quantizer, a KV cache or an editing method should keep in high precision or leave
alone. Massive dims (their blocks and the tokens that carry them), sink positions, and every super weight, with
a format and version field; massact.report.schema writes it and reads it back.

``massact quant`` reads it instead of scanning again: each massive dim carries a probe (a text and the position
where the dim is strongest) on which the quantized model's massive value is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import UsageError
from ...models.identity import check_same_weights
from ...models.loading import LoadedModel
from ...settings import Criterion
from ..function.sinks import sink_tokens
from ..mechanism.moe import expert_matrix
from ..results import Report

FORMAT = "massact-protect"
VERSION = 1
MAX_CARRIERS = 64  # per dim, the strongest (text, position) places; a large corpus has one per text


@dataclass(kw_only=True)
class Carrier:
    """A token that carries a massive dim: window ``text`` of the scan, ``position``, its largest value and block."""

    text: int
    position: int
    token: str
    block: int
    value: float


@dataclass(kw_only=True)
class ProtectedDim:
    """A massive dim: born at ``born_at``, massive in ``blocks``, largest at ``peak_block`` (``peak_value``).
    ``probe_text`` and ``probe_position`` are where it is strongest at its birth block: read it there."""

    dim: int
    born_at: int
    peak_block: int
    peak_value: float
    blocks: list[int]
    removed_at: list[int]
    probe_text: str
    probe_position: int
    carriers: list[Carrier]


@dataclass(kw_only=True)
class SinkPosition:
    """A position that carries massive activations in some scanned text (the attention-sink candidates), with the
    tokens seen there and in how many texts."""

    position: int
    tokens: list[str]
    texts: int


@dataclass(kw_only=True)
class ProtectedWeight:
    """A super weight: ``model.get_parameter(parameter)[tuple(index)] == value``; ``row`` and ``col`` are the last two
    entries of the stored index (a fused expert weight has the expert first)."""

    parameter: str
    row: int
    col: int
    index: list[int]
    value: float


@dataclass(kw_only=True)
class Protect:
    model: str
    source: str | None
    min_abs: float
    min_ratio: float
    massive_dims: list[ProtectedDim]
    sink_positions: list[SinkPosition]
    super_weights: list[ProtectedWeight]
    format: str = FORMAT
    version: int = VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def criterion(self) -> Criterion:
        """The scan's massive test, as saved with the list."""
        return Criterion(min_abs=self.min_abs, min_ratio=self.min_ratio)


def check_model(protect: Protect, lm: LoadedModel, where: str) -> None:
    """Refuse a protect list (read from ``where``) that does not belong to ``lm``: a dim, block or probe position
    outside the model, a probe text longer than its context, or a super weight whose stored value is not the model's
    (another model of the same shapes, or an edited list). One UsageError line naming the entry."""
    n_layers, d_model = len(lm.adapter.blocks(lm.model)), lm.config.hidden_size
    context = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    for i, d in enumerate(protect.massive_dims):
        here = f"{where}: massive_dims[{i}]"
        if not d.dim < d_model:
            raise UsageError(f"{here}.dim is {d.dim}; the model has {d_model} dims")
        for name, blocks in (("born_at", [d.born_at]), ("peak_block", [d.peak_block]), ("blocks", d.blocks),
                             ("removed_at", d.removed_at)):
            if any(b >= n_layers for b in blocks):
                raise UsageError(f"{here}.{name} names block {max(blocks)}; the model has {n_layers} blocks")
        tokens = len(lm.tokenizer(d.probe_text).input_ids)
        if context and tokens > context:
            raise UsageError(f"{here}.probe_text is {tokens} tokens; the model's context is {context}")
        if not d.probe_position < tokens:
            raise UsageError(f"{here}.probe_position is {d.probe_position}; the probe text has {tokens} tokens")
    for i, w in enumerate(protect.super_weights):
        here = f"{where}: super_weights[{i}]"
        try:
            parameter = lm.model.get_parameter(w.parameter)
        except AttributeError:
            raise UsageError(f"{here}.parameter {w.parameter!r} is not a parameter of the model") from None
        shape = list(parameter.shape)
        if len(w.index) != len(shape) or any(not 0 <= k < n for k, n in zip(w.index, shape)) or w.index[-2:] != [w.row, w.col]:
            raise UsageError(f"{here}.index {w.index} (row {w.row}, col {w.col}) is not an entry of {w.parameter}, shape {shape}")
        stored = float(parameter.detach()[tuple(w.index)])
        # A list made in float32 and read in bfloat16 differs by the rounding: half a step of the model's dtype.
        if not math.isclose(stored, w.value, rel_tol=torch.finfo(parameter.dtype).eps, abs_tol=1e-6):
            raise UsageError(f"{here}: {w.parameter}{w.index} is {stored:+.6g} in the model, the list says {w.value:+.6g}; "
                             "is this the model the list was made for?")


WRITES = ("birth", "growth", "reversal")  # the phases whose writing weights are super weights (they write a massive value)


def super_weight_coordinates(report: Report | dict) -> list[tuple[str, tuple[int, ...], float]]:
    """Every super weight the report names, once each: (parameter, index as stored, value). Yu et al.'s iterative
    list (``super_weights[*].weight``) where the report has one, the attributions of the blocks that write a dim
    (birth, growth: not the precursors' or erasers' top weights), and the experts'."""
    if isinstance(report, dict):
        get = lambda item, key: item.get(key) if isinstance(item, dict) else None  # noqa: E731
        weights = [get(s, "weight") for s in report.get("super_weights") or []]
        weights += [get(a, "super_weight") for a in report.get("attribution") or [] if a.get("role") in WRITES]
        moe = [(get(e.get("moe"), "super_weight"), e.get("layer")) for e in report.get("experts") or []]
        found = [(w["matrix"], (w["row"], w["col"]), w["value"]) for w in weights if w]
        found += [(expert_matrix(w["matrix"], layer), tuple(w["index"]), w["value"]) for w, layer in moe if w]
    else:
        weights = [s.weight for s in getattr(report, "super_weights", None) or []]
        weights += [a.super_weight for a in report.attribution if a.role in WRITES]
        found = [(w.matrix, (w.row, w.col), w.value) for w in weights]
        found += [(expert_matrix(e.moe.super_weight.matrix, e.layer), tuple(e.moe.super_weight.index), e.moe.super_weight.value)
                  for e in report.experts]
    unique: dict[tuple[str, tuple[int, ...]], float] = {}
    for matrix, index, value in found:
        unique.setdefault((matrix, tuple(int(i) for i in index)), float(value))
    return [(matrix, index, value) for (matrix, index), value in unique.items()]


def sink_positions(report: Report) -> list[SinkPosition]:
    """The sink positions: those the attention-sink pass uses (``massact.analysis.attention.sink_tokens``: positions
    that carry a massive dim persistently, and each dim's main carrier), with their tokens and in how many texts."""
    seen: dict[int, tuple[dict[str, None], set[int]]] = {}
    for sink in sink_tokens(report)[0] if report.massive else []:
        tokens, texts = seen.setdefault(sink.position, ({}, set()))
        tokens[sink.token] = None
        texts.add(sink.text)
    return [SinkPosition(position=p, tokens=list(tokens), texts=len(texts)) for p, (tokens, texts) in sorted(seen.items())]


def build(report: Report) -> Protect:
    """The protect list of a scan."""
    dims = []
    for d in report.dims:
        entries = [m for m in report.massive if m.dim == d.dim]
        peak = max(entries, key=lambda m: abs(m.value))
        probe = max((m for m in entries if m.layer == d.born_at), key=lambda m: abs(m.value))
        places: dict[tuple[int, int], Carrier] = {}
        for m in entries:
            best = places.get((m.text, m.position))
            if best is None or abs(m.value) > abs(best.value):
                places[m.text, m.position] = Carrier(text=m.text, position=m.position, token=m.token, block=m.layer, value=m.value)
        carriers = sorted(places.values(), key=lambda c: -abs(c.value))[:MAX_CARRIERS]
        dims.append(ProtectedDim(dim=d.dim, born_at=d.born_at, peak_block=peak.layer, peak_value=peak.value, blocks=d.persists, removed_at=d.removed_at, probe_text=report.texts[probe.text],
                                 probe_position=probe.position, carriers=carriers))
    weights = [ProtectedWeight(parameter=matrix, row=index[-2], col=index[-1], index=list(index), value=value) for matrix, index, value in super_weight_coordinates(report)]
    notes = [f"carriers: the {MAX_CARRIERS} strongest places per dim at most; report.json's `massive` has every one"]
    return Protect(model=report.model.name, source=report.model.source, min_abs=report.criterion.min_abs, min_ratio=report.criterion.min_ratio, massive_dims=dims,
                   sink_positions=sink_positions(report), super_weights=weights, notes=notes)


def check_report_model(report: Report, lm: LoadedModel, where: str) -> None:
    """Refuse, in one line, to re-run or extend a saved report (``where``) on a model other than the one it was made
    from: its weights' identity (``models.identity``, where the report saved one and the dtype is the same) and every
    super weight it names, at the value it saved (``check_model``)."""
    check_same_weights(report.model.weights_sha256, report.model.dtype, lm.model, where)
    check_model(build(report), lm, where)
