"""protect.json: the coordinates a quantizer, a KV cache or an editing method should keep in high precision or leave
alone. Massive dims (their blocks and the tokens that carry them), sink positions, and every super weight, with
a format and version field; massact.report.schema writes it and reads it back.

``massact quant`` reads it instead of scanning again: each massive dim carries a probe (a text and the position
where the dim is strongest) on which the quantized model's massive value is read.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ...capture.routing import expert_matrix
from ...errors import UsageError
from ...models.checkpoint import StreamedModel
from ...models.identity import check_same_weights
from ...models.info import ModelInfo
from ...models.loading import LoadedModel
from ..causal.results import SuperWeightStep
from ..detect.results import Findings, Massive
from ..function.sinks import sink_tokens
from ..mechanism.results import Attribution, ExpertAttribution, Mechanism

# The list's dataclasses live with the stage's other results; imported from here too, as the documentation does.
from .results import Carrier, Protect, ProtectedDim, ProtectedWeight, SinkPosition

MAX_CARRIERS = 64  # per dim, the strongest (text, position) places; a large corpus has one per text


def check_model(protect: Protect, lm: LoadedModel, where: str) -> None:
    """Refuse a protect list (read from ``where``) that does not belong to ``lm``: a dim, block or probe position
    outside the model, a probe text longer than its context, or a super weight whose stored value is not the model's
    (another model of the same shapes, or an edited list). One UsageError line naming the entry."""
    n_layers, d_model = len(lm.adapter.blocks(lm.model)), lm.config.hidden_size
    context = getattr(lm.config, "max_position_embeddings", None)
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
        check_super_weight(lm, i, w, where)


def check_super_weight(lm: LoadedModel, i: int, w: ProtectedWeight, where: str) -> None:
    """Refuse super weight ``i`` of a protect list (read from ``where``) whose index is not an entry of its parameter
    in ``lm``, or whose stored value is not the model's: one UsageError line naming it."""
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


def super_weight_coordinates(super_weights: list[SuperWeightStep], attribution: list[Attribution],
                             experts: list[ExpertAttribution]) -> list[tuple[str, tuple[int, ...], float]]:
    """Every super weight a scan names, once each: (parameter, index as stored, value). Yu et al.'s iterative list
    (``super_weights[*].weight``) where the scan has one, the attributions of the blocks that write a dim (birth,
    growth: not the precursors' or erasers' top weights), and the experts'."""
    weights = [s.weight for s in super_weights]
    weights += [a.super_weight for a in attribution if a.role in WRITES]
    found = [(w.matrix, (w.row, w.col), w.value) for w in weights]
    found += [(expert_matrix(e.moe.super_weight.matrix, e.layer), tuple(e.moe.super_weight.index), e.moe.super_weight.value)
              for e in experts]
    unique: dict[tuple[str, tuple[int, ...]], float] = {}
    for matrix, index, value in found:
        unique.setdefault((matrix, tuple(int(i) for i in index)), float(value))
    return [(matrix, index, value) for (matrix, index), value in unique.items()]


def sink_positions(massive: list[Massive], tokens: dict[int, list[str]]) -> list[SinkPosition]:
    """The sink positions: those the attention-sink pass uses (``massact.analysis.function.sinks.sink_tokens``:
    positions that carry a massive dim persistently, and each dim's main carrier), with their tokens and in how many
    texts."""
    seen: dict[int, tuple[dict[str, None], set[int]]] = {}
    for sink in sink_tokens(massive, tokens)[0] if massive else []:
        words, texts = seen.setdefault(sink.position, ({}, set()))
        words[sink.token] = None
        texts.add(sink.text)
    return [SinkPosition(position=p, tokens=list(words), texts=len(texts)) for p, (words, texts) in sorted(seen.items())]


def build(model: ModelInfo, findings: Findings, mechanism: Mechanism, super_weights: list[SuperWeightStep]) -> Protect:
    """The protect list of a scan: each massive dim of ``findings`` with its carriers and the probe it is read on (a
    kept window's text), the sink positions and every super weight (``super_weights``: the causal stage's, located
    in their matrices by the ``mechanism``'s attribution)."""
    dims, massive, texts, tokens = findings.dims, findings.massive, findings.texts, findings.tokens
    protected = []
    for d in dims:
        entries = [m for m in massive if m.dim == d.dim]
        peak = max(entries, key=lambda m: abs(m.value))
        probe = max((m for m in entries if m.layer == d.born_at), key=lambda m: abs(m.value))
        places: dict[tuple[int, int], Carrier] = {}
        for m in entries:
            best = places.get((m.text, m.position))
            if best is None or abs(m.value) > abs(best.value):
                places[m.text, m.position] = Carrier(text=m.text, position=m.position, token=m.token, block=m.layer, value=m.value)
        carriers = sorted(places.values(), key=lambda c: -abs(c.value))[:MAX_CARRIERS]
        protected.append(ProtectedDim(dim=d.dim, born_at=d.born_at, peak_block=peak.layer, peak_value=peak.value, blocks=d.persists,
                                      removed_at=d.removed_at, probe_text=texts[probe.text], probe_position=probe.position,
                                      carriers=carriers))
    weights = [ProtectedWeight(parameter=matrix, row=index[-2], col=index[-1], index=list(index), value=value)
               for matrix, index, value in super_weight_coordinates(super_weights, mechanism.attribution, mechanism.experts)]
    notes = [f"carriers: the {MAX_CARRIERS} strongest places per dim at most; report.json's `findings.massive` has every one"]
    return Protect(model=model.name, source=model.source, min_abs=findings.criterion.min_abs, min_ratio=findings.criterion.min_ratio,
                   massive_dims=protected, sink_positions=sink_positions(massive, tokens), super_weights=weights, notes=notes)


def check_saved_model(lm: LoadedModel, model: ModelInfo, protect: Protect, where: str) -> None:
    """Refuse, in one line, to re-run or extend a saved scan (``where``: its report) on a model other than the one it
    was made from: ``model``'s weights identity (``models.identity``, where the report saved one and the dtype is the
    same) and every super weight its ``protect`` list names, at the value it saved (``check_model``)."""
    check_same_weights(model.weights_sha256, model.dtype, lm.model, where)
    check_model(protect, lm, where)


def check_saved_streamed(streamed: StreamedModel, model: ModelInfo, protect: Protect, where: str) -> None:
    """``check_saved_model`` on a model read block by block, in one pass that reads every block once: each super
    weight is checked while its block is loaded, and the weights' identity from the samples taken then (the digest
    the streamed scan saved, and the one of the model in memory)."""
    from ...capture.streaming import blocks

    lm = streamed.lm
    check_model(replace(protect, super_weights=[]), lm, where)
    prefix = f"{lm.adapter.layers_path(lm.model)}."
    block_of = {i: int(w.parameter[len(prefix):].split(".", 1)[0]) for i, w in enumerate(protect.super_weights)
                if w.parameter.startswith(prefix)}
    for i, w in enumerate(protect.super_weights):
        if i not in block_of:  # the embeddings, final norm and head stay loaded
            check_super_weight(lm, i, w, where)
    for layer in blocks(streamed, range(len(lm.adapter.blocks(lm.model)))):
        for i, w in enumerate(protect.super_weights):
            if block_of.get(i) == layer:
                check_super_weight(lm, i, w, where)
    check_same_weights(model.weights_sha256, model.dtype, lm.model, where, streamed.samples)
