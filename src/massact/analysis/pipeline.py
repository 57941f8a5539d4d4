"""The whole investigation: scan, detect, find the writer, open the MLP, attribute to neurons and a super weight."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .. import __version__
from ..capture.probe import ATTN_Z, block_output, probe_block
from ..errors import UsageError
from ..models.adapters.base import weight_out_in
from ..models.loading import LoadedModel, load, wrap
from ..texts import Corpus
from . import anatomy as anatomy_step
from .attention import attention_sinks
from .attribution import contributions, down_row, mlp_weight_stats, super_weight
from .origin import decomposition_gap, head_split, writer
from .perplexity import default_eval_text
from .precision import headroom
from .protect import build as build_protect
from .quant import measure as measure_quantization
from .moe import MoeAttribution, attribute_moe, is_moe_block
from .norms import norm_factors
from .results import (Anatomy, Attribution, BirthState, CorpusInfo, Criterion, DimSummary, ExpertAttribution, LayerStats, Massive,
                      ModelInfo, NormFactors, Origin, Report)
from .scan import detect, distributed_rank, group_dims, layer_stats, scan_layers
from .verification import MAX_INPUTS, verify as verify_report

CANDIDATES = 512  # largest |a| kept per block; massive entries are a handful, so this bounds nothing real


# progress(stage, total or None) returns the function to call after each step of that stage.
Progress = Callable[[str, "int | None"], Callable[[], None]]


def _silent(stage: str, total: int | None) -> Callable[[], None]:
    return lambda: None


@dataclass
class Event:
    """A (dim, text, position, block) to explain: where the dim is born, or where it is removed."""

    dim: int
    text: int
    position: int
    layer: int
    role: str


@torch.no_grad()
def scan(
    model: LoadedModel | nn.Module | str | None = None,
    texts: Sequence[str] | Corpus | None = None,
    *,
    tokenizer=None,
    top_k: int = 5,
    min_abs: float = 100.0,
    min_ratio: float = 1000.0,
    top_neurons: int = 10,
    batch_size: int = 8,
    max_length: int | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    verify: bool = False,
    eval_text: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    progress: Progress | None = None,
    quant: bool = False,
    quant_grid: str = "default",
    clip_z: float | None = None,
    block_size: int | None = None,
) -> Report | None:
    """Find the massive activations of ``model`` on ``texts`` and trace each to the block, sublayer, MLP checkpoint,
    neurons and weight that write it. With ``verify``, confirm by intervention and measure the attention sinks
    (perplexity on ``eval_text``, default: the shipped public-domain sample).

    ``model``: a name for ``massact.models.load`` (None: the embedded SmolLM2-135M-Instruct), a loaded model, or an
    ``nn.Module`` with ``tokenizer``. ``texts``: None for the built-in sentences. ``progress``: see ``Progress``.
    With ``quant``, also measure what weight and activation quantization do (``massact.analysis.quant``; grid
    ``quant_grid``, clipping z-score ``clip_z``, flat block size ``block_size``).
    Launched as several processes (torchrun, accelerate launch), all share the corpus scan and only rank 0 gets the
    report; the others get None.
    """
    lm = _as_loaded(model, tokenizer, dtype, device)
    corpus = texts if isinstance(texts, Corpus) else Corpus(tuple(texts) if texts is not None else ())
    total = corpus.check()
    criterion = Criterion(min_abs=min_abs, min_ratio=min_ratio)

    progress = progress or _silent
    # Without --max-length a window is a text, so the number of texts is the number of forward passes.
    advance = progress("forward passes over the texts", total if max_length is None else None)
    counts = Counts()
    stream = (window.ids for window in windows(lm, corpus, max_length, counts))
    layer_scan = scan_layers(lm, stream, CANDIDATES, lambda _: advance(), batch_size, checkpoint, checkpoint_every, resume)
    if distributed_rank()[0] != 0:
        return None  # launched as several processes: they shared the scan, the first one explains and reports
    # Keep only the windows the statistics point at (and the first few, for the input-dependence check).
    wanted = {int(t) for top in layer_scan.tops if top.labels is not None for t in top.labels[:, 0].tolist()}
    texts, inputs, tokens = collect(lm, corpus, max_length, wanted | set(range(MAX_INPUTS)))
    criterion.median_rel_error = layer_scan.histograms[0].rel_error
    layers = layer_stats(layer_scan, tokens, top_k)
    massive = detect(layer_scan, tokens, criterion)
    dims = group_dims(massive, len(layers))
    warnings = _scan_warnings(layer_scan, massive)
    if counts.windows > counts.texts:
        warnings.append(f"{counts.texts} text(s) were split into {counts.windows} windows of at most {max_length} tokens; "
                        "each window is scanned as a text of its own")
    n_tokens = round(layer_scan.histograms[0].total / lm.model.config.hidden_size)
    spec = dict(texts=list(corpus.texts), file=corpus.file, dataset=corpus.dataset, max_texts=corpus.max_texts, max_length=max_length)
    corpus_info = CorpusInfo(corpus.describe(), counts.texts, counts.windows, n_tokens, spec)

    origins, anatomies, attributions, experts = explain(lm, pick_events(dims, massive), inputs, tokens, layers, criterion,
                                                        top_neurons, warnings)

    report = Report(
        model=model_info(lm),
        corpus=corpus_info,
        texts=texts,
        tokens=tokens,
        criterion=criterion,
        layers=layers,
        massive=massive,
        dims=dims,
        origin=origins,
        anatomy=anatomies,
        attribution=attributions,
        conclusion=[],
        warnings=warnings,
        versions=_versions(),
        experts=experts,
    )
    report.conclusion = conclude(report)
    report.birth_state = birth_state(lm, report, inputs)
    if verify and report.dims and lm.adapter.encoder:
        report.warnings.append("verification skipped: it measures perplexity, which an encoder (masked LM) does not have")
    elif verify and report.dims:
        source = "massact/data/eval.txt (Declaration of Independence, Gettysburg Address)" if eval_text is None else "--eval-file"
        report.verification = verify_report(lm, report, inputs, eval_text or default_eval_text(), source,
                                            progress("interventions", None))
        sinks: dict[int, dict[int, None]] = {}  # text -> its massive positions, in order, once each
        for m in massive:
            sinks.setdefault(m.text, {})[m.position] = None
        report.attention = attention_sinks(lm, inputs, {t: list(p) for t, p in sinks.items()}, min(d.born_at for d in dims))
    report.precision = headroom(report.layers)
    if quant and report.dims:
        report.quantization = measure_quantization(lm, build_protect(report), eval_text, quant_grid, clip_z, block_size, progress)
    return report


def _as_loaded(model, tokenizer, dtype: str, device: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise UsageError("a model object needs its tokenizer: scan(model, texts, tokenizer=...)")
        return wrap(model, tokenizer)
    return load(model, dtype=dtype, device=device)


class Window(NamedTuple):
    """One forward pass's worth of a text: the text's index and words, and the ids [1, n] of this window of it."""

    text_index: int
    text: str
    ids: torch.Tensor
    split: bool  # the text is longer than --max-length, so this window holds part of it


@dataclass
class Counts:
    """How many texts and windows a pass over the corpus has read so far."""

    texts: int = 0
    windows: int = 0


def _check_max_length(lm: LoadedModel, max_length: int | None) -> None:
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if max_length is not None and (max_length < 2 or (context and max_length > context)):
        raise UsageError(f"--max-length must be between 2 and the model's context ({context} tokens)")


def windows(
    lm: LoadedModel, texts: Iterable[str], max_length: int | None = None, counts: Counts | None = None
) -> Iterator[Window]:
    """Each window to scan, tokenized one text at a time as they are consumed.

    Without ``max_length`` a text longer than the model's context is refused. With it, a longer text is split into
    consecutive windows of at most ``max_length`` tokens, each scanned as a text of its own (never truncated).
    """
    _check_max_length(lm, max_length)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    for index, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise UsageError(f"text {index + 1} has no tokens")
        if max_length is None and context and ids.shape[1] > context:
            raise UsageError(
                f"text {index + 1} has {ids.shape[1]} tokens, more than the model's context of {context}: split it, or pass --max-length"
            )
        parts = [ids] if max_length is None else list(ids.split(max_length, dim=1))
        if counts is not None:
            counts.texts, counts.windows = counts.texts + 1, counts.windows + len(parts)
        for window in parts:
            yield Window(index, text, window, len(parts) > 1)


def collect(
    lm: LoadedModel, texts: Iterable[str], max_length: int | None, wanted: set[int]
) -> tuple[dict[int, str], dict[int, torch.Tensor], dict[int, list[str]]]:
    """For the wanted window indices only: the window's text, its token ids, its decoded tokens. Reads the corpus
    again, lazily, and stops after the last wanted window."""
    found: tuple[dict, dict, dict] = ({}, {}, {})
    last = max(wanted, default=-1)
    for number, window in enumerate(windows(lm, texts, max_length)):
        if number > last:
            break
        if number in wanted:
            found[0][number] = lm.tokenizer.decode(window.ids[0]) if window.split else window.text
            found[1][number] = window.ids
            found[2][number] = [lm.tokenizer.decode([i]) for i in window.ids[0].tolist()]
    return found


def pick_events(dims: list[DimSummary], massive: list[Massive]) -> list[Event]:
    """Per dim: its strongest entry at the birth block, and at each removal the strongest entry just before it."""
    events = []
    for summary in dims:
        for role, layer, looked_at in [("birth", summary.born_at, summary.born_at)] + [
            ("removal", r, r - 1) for r in summary.removed_at
        ]:
            strongest = max((m for m in massive if m.dim == summary.dim and m.layer == looked_at), key=lambda m: abs(m.value))
            events.append(Event(summary.dim, strongest.text, strongest.position, layer, role))
    return events


def explain(
    lm: LoadedModel, events: list[Event], inputs: dict[int, torch.Tensor], tokens: dict[int, list[str]], layers: list[LayerStats],
    criterion: Criterion, top_neurons: int, warnings: list[str],
) -> tuple[list[Origin], list[Anatomy], list[Attribution], list[ExpertAttribution]]:
    """Steps 3-6 for each event: the writer, and for an MLP writer its anatomy and neurons (or experts). One probe
    pass per (text, block); checks that fail their second computation are appended to ``warnings``."""
    origins, anatomies, attributions, experts = [], [], [], []
    probes = {}
    for text, layer in dict.fromkeys((e.text, e.layer) for e in events):
        positions = sorted({e.position for e in events if (e.text, e.layer) == (text, layer)})
        probes[text, layer] = (positions, probe_block(lm, inputs[text], layer, positions))
    tolerance = 1e-3 if lm.dtype == torch.float32 else 2e-2
    for event in events:
        positions, vectors = probes[event.text, event.layer]
        at = {site: v[positions.index(event.position)] for site, v in vectors.items()}
        cause = None
        if event.role == "removal":
            cause = removal_cause(float(at[lm.adapter.stream][event.dim]), layers[event.layer - 1].median, criterion)
        origin = explain_origin(lm, event, at, tokens, cause)
        if origin.resid_mid is not None:  # post-LN: resid_sum = resid_mid + mlp
            gap = decomposition_gap(origin.resid_mid, 0.0, origin.mlp, origin.resid_out)
        else:
            gap = decomposition_gap(origin.resid_in, origin.attn, origin.mlp, origin.resid_out)
        if gap > tolerance:
            warnings.append(f"block {event.layer}: the block's branches differ from its output by {gap:.1e} (relative)")
        if origin.norm is not None and origin.norm.error > tolerance:
            warnings.append(f"block {event.layer} dim {event.dim}: the norm's factors miss its output by {origin.norm.error:.1e}")
        origins.append(origin)
        if origin.writer == "mlp" and cause != "median" and lm.adapter.moe:
            block = lm.adapter.module(lm.model, event.layer, "mlp")
            if not is_moe_block(block):
                warnings.append(f"block {event.layer}'s MLP is dense in this mixture-of-experts model: not attributed to neurons")
                continue
            split = attribute_moe(block, at["mlp_in"], event.dim, top_neurons)
            if split.error > tolerance:
                warnings.append(f"block {event.layer} dim {event.dim}: the experts' contributions miss the output by {split.error:.1e}")
            experts.append(ExpertAttribution(**_place(event, tokens), moe=split))
        elif origin.writer == "mlp" and cause != "median":  # when the median grew, nothing wrote the change
            attribution = attribute(lm, event, at, tokens, top_neurons)
            if attribution.error > tolerance:
                warnings.append(
                    f"block {event.layer} dim {event.dim}: neuron contributions miss the output by {attribution.error:.1e}"
                )
            attributions.append(attribution)
            anatomies.append(open_mlp(lm, event, at, tokens, [n.neuron for n in attribution.neurons]))

    return origins, anatomies, attributions, experts


def explain_origin(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, cause: str | None) -> Origin:
    adapter, dim = lm.adapter, event.dim
    resid_in, attn, mlp, resid_out = (float(at[s][dim]) for s in ("resid_in", "attn_out", "mlp_out", adapter.stream))
    resid_mid = float(at["resid_mid"][dim]) if adapter.post_ln else None
    # Post-LN: the attention half lands as resid_mid = LN(resid_in + attn) and the sum is resid_mid + mlp.
    who = writer(event.role, resid_in, resid_mid if adapter.post_ln else attn, mlp, resid_out)
    raw = {site: float(at[adapter.raw(site)][dim]) if site in adapter.branch_norms else None for site in ("attn_out", "mlp_out")}
    norm = None
    if adapter.post_ln:  # how the block's last LayerNorm scales the massive sum into the block output
        norm = _norm_factors(lm, event.layer, adapter.sites["resid_sum"][0], at["resid_sum"], at["resid_out"], dim)
    elif f"{who}_out" in adapter.branch_norms:
        branch = f"{who}_out"
        norm = _norm_factors(lm, event.layer, adapter.branch_norms[branch], at[adapter.raw(branch)], at[branch], dim)
    # Heads are split only where attention really wrote the change: not when the median grew past the value.
    heads = head_split(lm, event.layer, at[ATTN_Z], dim) if who == "attn" and cause != "median" else None
    return Origin(**_place(event, tokens), writer=who, resid_in=resid_in, attn=attn, mlp=mlp, resid_out=resid_out, cause=cause,
                  heads=heads, attn_raw=raw["attn_out"], mlp_raw=raw["mlp_out"], resid_mid=resid_mid, norm=norm)


def _norm_factors(lm: LoadedModel, layer: int, path: str, raw: torch.Tensor, landed: torch.Tensor, dim: int) -> NormFactors:
    module = lm.adapter.module(lm.model, layer, path)
    return norm_factors(module, lm.adapter.param_name(lm.model, layer, path), raw, landed, dim)


def removal_cause(value: float, previous_median: float, criterion: Criterion) -> str:
    """Did the value fall ("value"), or would it still be massive against the previous block's median ("median")?"""
    held = abs(value) >= criterion.min_abs and abs(value) >= criterion.min_ratio * previous_median
    return "median" if held else "value"


def birth_state(lm: LoadedModel, report: Report, inputs: list[torch.Tensor]) -> BirthState | None:
    """The hidden state at the birth of the strongest massive dim, where its strongest entry sits."""
    if not report.dims:
        return None
    strongest = max(report.dims, key=lambda d: abs(d.max_value))
    birth = next(o for o in report.origin if o.dim == strongest.dim and o.role == "birth")
    magnitude = block_output(lm, inputs[birth.text], birth.layer).abs()
    dims = sorted({m.dim for m in report.massive if m.layer == birth.layer and m.text == birth.text})
    rows = [[float(f"{v:.4g}") for v in row] for row in magnitude.tolist()]
    return BirthState(birth.layer, birth.text, report.tokens[birth.text], dims, rows)


def _place(event: Event, tokens: list[list[str]]) -> dict:
    return dict(layer=event.layer, text=event.text, position=event.position, token=tokens[event.text][event.position],
                dim=event.dim, role=event.role)


def attribute(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, top: int) -> Attribution:
    weight_row, bias = down_row(lm.adapter, lm.model, event.layer, event.dim)
    output = float(at[lm.adapter.raw("mlp_out")][event.dim])  # the neurons make the raw output; a norm may follow
    neurons, error, for_90 = contributions(at["mlp_act"], weight_row, bias, output, top)
    return Attribution(
        **_place(event, tokens),
        output=output,
        bias=bias,
        error=error,
        neurons=neurons,
        neurons_for_90pct=for_90,
        super_weight=super_weight(lm.adapter, lm.model, event.layer, event.dim, neurons[0].neuron),
        weights=mlp_weight_stats(lm.adapter, lm.model, event.layer),
        landed=float(at["mlp_out"][event.dim]) if "mlp_out" in lm.adapter.branch_norms else None,
    )


def open_mlp(lm: LoadedModel, event: Event, at: dict[str, torch.Tensor], tokens, neurons: list[int]) -> Anatomy:
    points = anatomy_step.checkpoints({**at, "mlp_out": at[lm.adapter.raw("mlp_out")]}, lm.adapter.gated)
    function = lm.adapter.module(lm.model, event.layer, lm.adapter.act_fn)
    pre = at["mlp_gate"] if lm.adapter.gated else at["mlp_up"]
    impact = anatomy_step.activation_impact(function, pre, at["mlp_up"] if lm.adapter.gated else None, neurons)
    return Anatomy(
        **_place(event, tokens),
        checkpoints=points,
        explosion_point=anatomy_step.explosion_point(points),
        activation_impact=impact,
    )


def model_info(lm: LoadedModel) -> ModelInfo:
    config = lm.model.config
    if lm.adapter.moe:  # one expert's width
        d_mlp = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    else:
        d_mlp = weight_out_in(lm.adapter.module(lm.model, 0, lm.adapter.mlp_down)).shape[1]
    return ModelInfo(
        name=lm.name,
        architecture=type(lm.model).__name__,
        family=lm.adapter.family,
        n_layers=len(lm.adapter.blocks(lm.model)),
        d_model=config.hidden_size,
        d_mlp=d_mlp,
        n_heads=config.num_attention_heads,
        gated=lm.adapter.gated,
        dtype=str(lm.dtype).removeprefix("torch."),
        device=str(lm.device),
        source=lm.source,
        stream=lm.adapter.stream,
        notes=lm.adapter.notes,
    )


def _scan_warnings(layer_scan, massive: list[Massive]) -> list[str]:
    warnings = []
    if layer_scan.nonfinite:
        layer, text, position, dim = layer_scan.nonfinite
        warnings.append(
            f"non-finite activation (inf/nan) first at block {layer}, text {text}, position {position}, dim {dim}:"
            " the dtype overflowed; use bfloat16 or float32"
        )
    full = [layer for layer in {m.layer for m in massive} if sum(m.layer == layer for m in massive) >= CANDIDATES]
    if full:
        warnings.append(f"blocks {sorted(full)} have more than {CANDIDATES} massive entries; only the largest are listed")
    return warnings


def _versions() -> dict[str, str]:
    import transformers

    return {"massact": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


_PLACES = {
    "mlp_gate": "the gate projection (mlp_gate)",
    "mlp_up": "the up projection (mlp_up)",
    "mlp_out": "the down projection (mlp_out)",
}


def _explosion_words(name: str, gated: bool) -> str:
    if name == "mlp_act":
        return "the gated product act(gate) x up (mlp_act)" if gated else "the activation function (mlp_act)"
    return _PLACES.get(name, name)


def _removal_words(o: Origin) -> str:
    if o.cause == "median":
        return f"falls under the ratio at block {o.layer} because the median |a| grows (the value holds: {o.resid_in:+.1f} -> {o.resid_out:+.1f})"
    return f"is removed by block {o.layer}'s {'MLP' if o.writer == 'mlp' else 'attention'} ({o.resid_in:+.1f} -> {o.resid_out:+.1f})"


def _expert_words(m: MoeAttribution) -> str:
    routed = ", ".join(f"expert {e.expert} (router weight {e.router_weight:.3f}, {e.share:.1%})" for e in m.experts)
    text = f"the router sent it to {routed}"
    if m.shared_expert is not None:
        text += f" and the shared expert gives {m.shared_expert.share:.1%}"
    where = "the shared expert" if m.top_expert is None else f"expert {m.top_expert}"
    w = m.super_weight
    index = ", ".join(map(str, w.index))
    return (f"{text}; in {where}, neuron {m.neurons[0].neuron} gives {m.neurons[0].share:.1%} (router weight x act x weight); "
            f"super weight {w.matrix}[{index}] = {w.value:+.4f}, rank {w.rank} of {w.entries:,}")


def _norm_words(n: NormFactors, written: str, post_ln: bool) -> str:
    if post_ln:
        return (f"it exists only before the LayerNorm {n.parameter.removesuffix('.weight')}, which scales it by "
                f"{n.normalization:.3g} (1/std) x gain {n.gain:.3g} to {n.landed:+.2f} in the block output")
    factors = f"raw {n.raw:+.2f} x normalisation {n.normalization:.3g} x gain {n.gain:.4g} = {n.landed:+.1f}"
    if n.amplifier:
        return (f"the {written}'s own norm is the amplifier ({factors}): its gain on this dim is {n.gain_ratio:.0f}x its "
                f"median gain, so the norm weight {n.parameter}[{n.dim}] = {n.weight:+.4g} acts as a super weight")
    return f"the {written}'s own norm passes it on ({factors}; gain {n.gain_ratio:.1f}x its median)"


def conclude(report: Report) -> list[str]:
    """Plain-language sentences, one per massive dim, built from the numbers above them in the report."""
    if not report.dims:
        best = max(report.layers, key=lambda s: s.ratio)
        top = best.top[0]
        return [
            f"No massive activations under the criterion (|a| >= {report.criterion.min_abs:g} and >= "
            f"{report.criterion.min_ratio:g} x median): the largest top1/median is {best.ratio:.0f}x, dim {top.dim} "
            f"= {top.value:.1f} at block {best.layer}."
        ]
    sentences = []
    gated = report.model.gated
    for summary in sorted(report.dims, key=lambda d: -abs(d.max_value)):
        birth = next(o for o in report.origin if o.dim == summary.dim and o.role == "birth")
        written = {"mlp": "MLP", "attn": "attention"}[birth.writer]
        branch = birth.mlp if birth.writer == "mlp" else birth.attn
        stream = "the residual sum before the block's LayerNorm" if report.model.stream == "resid_sum" else "resid_out"
        text = (
            f"dim {summary.dim} at token {birth.position} ({birth.token!r}) is born in block {birth.layer}, written by its "
            f"{written} ({branch:+.1f} of {stream} {birth.resid_out:+.1f}, resid_in was {birth.resid_in:+.1f})"
        )
        if birth.norm is not None:
            text += "; " + _norm_words(birth.norm, written, report.model.stream == "resid_sum")
        attribution = next((a for a in report.attribution if a.dim == summary.dim and a.role == "birth"), None)
        anatomy = next((a for a in report.anatomy if a.dim == summary.dim and a.role == "birth"), None)
        if attribution and anatomy:
            top = attribution.neurons[0]
            weight = attribution.super_weight
            count = attribution.neurons_for_90pct
            raw = " of the raw MLP output" if attribution.landed is not None else " of it"
            text += (
                f"; {count} neuron{'s' if count != 1 else ''} give 90%{raw}, neuron {top.neuron} alone "
                f"{top.share:.1%}; the explosion is at {_explosion_words(anatomy.explosion_point, gated)}; "
                f"super weight {weight.matrix}[{weight.row}, {weight.col}] = {weight.value:+.4f}, "
                f"rank {weight.rank} of {weight.entries:,} entries by |w|"
            )
        elif split := next((e.moe for e in report.experts if e.dim == summary.dim and e.role == "birth"), None):
            text += "; " + _expert_words(split)
        elif birth.heads:
            head = birth.heads[0]
            text += f"; head {head.head} gives {head.share:.1%} of the attention output"
        last = summary.persists[-1]
        count = len(summary.persists)
        text += f". It is massive in block {last}" if count == 1 else f". It is massive in {count} blocks, {summary.born_at} to {last}"
        removals = [o for o in report.origin if o.dim == summary.dim and o.role == "removal"]
        if removals:
            text += ", and " + ", ".join(_removal_words(o) for o in removals)
        else:
            text += ", and is still massive at the last block"
        sentences.append(text + ".")
    return sentences
