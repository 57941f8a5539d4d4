"""The whole investigation: scan, detect, find the writer, open the MLP, attribute to neurons and a super weight."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .analysis.causal.budget import verification_seconds, verify_by_default
from .analysis.causal.expert_pruning import prune_super_experts
from .analysis.causal.results import Causal
from .analysis.causal.stream import streamed_causal
from .analysis.causal.superweights import all_super_weights
from .analysis.causal.verification import MAX_INPUTS, replacement_values, verify_by_intervention
from .analysis.deploy.precision import headroom
from .analysis.deploy.quant import measure_quantization, sweep_options
from .analysis.deploy.results import Deploy, Protect, Quantization
from .analysis.deploy.stream import streamed_quantization
from .analysis.detect.results import Findings
from .analysis.detect.resume import scan_identity
from .analysis.detect.scan import (
    Checkpointing,
    LayerScan,
    detect,
    distributed_rank,
    group_dims,
    layer_stats,
    release_processes,
    scan_layers,
    scan_warnings,
)
from .analysis.detect.stream import StreamPlace, stream_layers
from .analysis.detect.windows import Counts, collect, windows
from .analysis.evaluation.embeddings import headless
from .analysis.evaluation.perplexity import EvalText, default_eval_text, eval_windows
from .analysis.evaluation.windows import EVAL_BATCH, evaluation_for
from .analysis.function.qk import qk_values
from .analysis.function.results import CompressionValley, QkValues
from .analysis.function.sinks import SINK_TEXTS, sink_analysis
from .analysis.function.valley import compression_valley, read_valley, valley_texts
from .analysis.mechanism.explain import (
    birth_state,
    explain,
    explain_streams,
    pick_events,
    probe_events,
    stream_birth_state,
    token_values,
)
from .analysis.mechanism.lifeline import lifelines, origin_layers, stream_lifelines
from .analysis.mechanism.results import Mechanism
from .analysis.mechanism.stream import EventPass, explain_streamed, streamed_lifelines, streamed_valley
from .analysis.mechanism.streams import stream_origins
from .analysis.mechanism.super_experts import find_super_experts
from .analysis.profile.build import build_profile, count_carriers
from .analysis.profile.results import Profile
from .analysis.results import CorpusInfo, Report, build_protect, check_report_model
from .analysis.trigger.stream import streamed_trigger
from .analysis.trigger.trigger import triggers
from .capture.stats import LogHistogram
from .errors import UsageError
from .models.checkpoint import StreamedModel
from .models.failures import guarded
from .models.identity import weights_sha256
from .models.info import model_info
from .models.loading import LoadedModel, load, wrap
from .numbers import size as in_bytes
from .report.conclusion import NO_MASK_TOKEN, conclude
from .settings import ScanSettings
from .texts import Corpus, read_eval_file

# progress(stage, total or None) returns the function to call after each step of that stage (with a new description
# of the stage, or none).
Progress = Callable[[str, "int | None"], Callable[..., None]]


def _silent(stage: str, total: int | None) -> Callable[..., None]:
    return lambda description=None: None


@guarded
@torch.no_grad()
def scan(
    model: LoadedModel | nn.Module | str | None = None,
    texts: Sequence[str] | Corpus | None = None,
    settings: ScanSettings | None = None,
    *,
    tokenizer=None,
    eval_text: str | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    quantization: Quantization | None = None,
    auto_verify: bool = False,
    **options,
) -> Report | None:
    """Find the massive activations of ``model`` on ``texts`` and trace each to the block, sublayer, MLP checkpoint,
    neurons and weight that write them. With ``verify``, confirm by intervention and measure the attention sinks.
    Launched as several processes (torchrun, accelerate launch), all share the corpus scan and only rank 0 gets the
    report.

    Args:
        model: A name for ``massact.models.load`` (None: the embedded SmolLM2-135M-Instruct), a loaded model, or an
            ``nn.Module`` with ``tokenizer``.
        texts: The texts to scan, a list of strings; None for the built-in sentences.
        settings: A ``ScanSettings`` (default: the CLI's defaults).
        tokenizer: The tokenizer of an ``nn.Module`` ``model``.
        eval_text: The text perplexity is measured on when verifying (default: ``settings.eval_file``, else the
            shipped public-domain sample).
        checkpoint: Where the corpus pass saves its merged state every ``settings.checkpoint_every`` batches.
        resume: Continue the corpus pass from ``checkpoint``.
        progress: Reports the stages' progress; see ``Progress``.
        quantization: A saved report's sweep of this model, kept (with ``settings.quant``) instead of measured again
            when this scan would measure it on the same inputs (``Quantization.inputs_sha256``): the same protect
            list, evaluation text, dtype, device and grid.
        auto_verify: Without ``verify``, verify where the interventions' time, estimated from the corpus pass's
            (``analysis.causal.budget``), fits; the report's warnings say which and why.
        **options: Single fields of ``settings`` to change (``top_k=3, verify=True``).

    Returns:
        The report; None on every process but rank 0 of a multi-process launch.

    Raises:
        TypeError: ``model``, ``texts``, ``tokenizer`` or ``settings`` is not of a kind scan takes, or an option
            name is unknown.
        ValueError: ``texts`` is empty.
        UsageError: Bad input a user can fix (a ``ValueError``): an option out of range, a model that cannot be
            loaded or is not supported, a text longer than the model's context.
        ModelCodeError: The model's own forward pass failed (a ``UsageError``).
    """
    check_arguments(model, texts, tokenizer, settings)
    settings = (settings or ScanSettings()).replace(**options).check()
    if eval_text is None and settings.eval_file is not None:
        eval_text = read_eval_file(settings.eval_file)
    lm = _as_loaded(model, tokenizer, settings.dtype, settings.device)
    corpus = texts if isinstance(texts, Corpus) else Corpus(texts=tuple(texts) if texts is not None else ())
    total = corpus.check()
    if settings.verify or auto_verify:  # an evaluation text too short for perplexity fails now, not after the scan
        eval_windows(lm, eval_text or default_eval_text())
    progress = progress or _silent
    began = time.perf_counter()
    found = detect_stage(lm, corpus, total, settings, checkpointing(lm, settings, checkpoint, resume), progress)
    if found is None:
        return None  # launched as several processes: they shared the scan, the first one explains and reports
    findings, warnings = found.findings, list(found.warnings)
    why = None
    if auto_verify and not settings.verify:
        verify, why = _by_estimate(lm, found, time.perf_counter() - began, eval_text or default_eval_text())
        settings = settings.replace(verify=verify)
    mechanism = mechanism_stage(lm, found, settings, warnings)
    trigger = triggers(lm, found.inputs, findings, mechanism, settings, found.corpus.windows)
    causal, causal_warnings = causal_stage(lm, found, mechanism, settings, eval_text, progress)
    causal.default = why
    qk = qk_stage(lm, found, settings, eval_text)
    report = Report(model=model_info(lm), corpus=found.corpus, settings=settings, findings=findings, mechanism=mechanism,
                    trigger=trigger, causal=causal, deploy=Deploy(), conclusion=[], warnings=warnings + causal_warnings,
                    versions=_versions(), valley=valley_stage(lm, found, causal), qk=qk)
    report.deploy = deploy_stage(lm, report, settings, eval_text, progress, quantization)
    report.conclusion = conclude(report)
    return report


def _by_estimate(lm: LoadedModel, found: Detection, corpus_seconds: float, eval_text: str, rate: float | None = None
                 ) -> tuple[bool, str]:
    """Whether to verify by default, and why (``analysis.causal.budget``), at ``rate`` seconds per token and block
    (None: timed now on the first evaluation batch, a forward pass of the whole model)."""
    windows = eval_windows(lm, eval_text)
    n_layers = len(lm.adapter.blocks(lm.model))
    if rate is None:
        first = torch.cat([w for w in windows if w.shape[1] == windows[0].shape[1]][:EVAL_BATCH])
        began = time.perf_counter()
        lm.model(input_ids=first.to(lm.device), use_cache=False)
        rate = (time.perf_counter() - began) / (first.numel() * n_layers)
    other = sum(found.inputs[index].shape[1] for index in sorted(found.inputs)[:SINK_TEXTS])
    estimate = verification_seconds(rate=rate, n_layers=n_layers, eval_tokens=sum(w.shape[1] for w in windows),
                                    births=[d.born_at for d in found.findings.dims], other_tokens=other)
    return verify_by_default(estimate, corpus_seconds)


@guarded
@torch.no_grad()
def scan_streamed(streamed: StreamedModel, texts: Sequence[str] | Corpus | None = None, settings: ScanSettings | None = None,
                  *, place: StreamPlace | None = None, progress: Progress | None = None, auto_verify: bool = False,
                  quantization: Quantization | None = None, **options) -> Report:
    """``scan`` of a model read block by block from its checkpoint (``models.checkpoint.load_streamed``): the corpus
    pass with each block's weights read once, the massive entries and dims, the super experts of a mixture of experts
    and the float16 headroom; two more passes over the kept texts for the mechanism; with ``settings.verify``, one
    more for the causal stage and the Q/K disruption test (``analysis.causal.stream``); with ``settings.quant``, the
    quantization sweep in two more (``quantize_streamed``). ``place``: where the hidden states go beyond memory and the
    resumable state (see ``StreamPlace``). ``auto_verify``: as for ``scan``. The compression valley and the Q/K
    concentration are read in the first mechanism pass (in a pass of their own where there is none). The trigger runs
    in the second, on the blocks up to the deepest its passes reach, kept loaded where they fit ``place``'s allowance
    (``analysis.trigger.stream``; else the report's warnings say it is not measured). ``quantization``: as for
    ``scan``, a saved sweep kept where it was measured on the same inputs."""
    settings = (settings or ScanSettings()).replace(**options).check()
    lm = streamed.lm
    corpus = texts if isinstance(texts, Corpus) else Corpus(texts=tuple(texts) if texts is not None else ())
    corpus.check()
    n_layers = len(lm.adapter.blocks(lm.model))
    size = streamed.checkpoint.size
    advance = (progress or _silent)(f"streamed pass: {n_layers} blocks, {in_bytes(size)} to read", n_layers)
    counts = Counts()
    stream = [window.ids for window in windows(lm, corpus, settings.max_length, counts)]
    start = streamed.checkpoint.bytes_read

    def on_block(layer: int) -> None:
        read = streamed.checkpoint.bytes_read - start
        advance(f"streamed pass: block {layer + 1} of {n_layers}, {in_bytes(read)} of {in_bytes(size)} read")

    began = time.perf_counter()
    layer_scan = stream_layers(streamed, stream, batch_size=settings.batch_size, on_block=on_block, place=place)
    found = detection(lm, corpus, counts, layer_scan, settings)
    why = None
    if auto_verify and not settings.verify:  # at the pass's compute per token and block, its reads left out
        rate = streamed.computing / max(found.corpus.tokens * n_layers, 1)
        verify, why = _by_estimate(lm, found, time.perf_counter() - began, _eval_text(settings).text, rate)
        settings = settings.replace(verify=verify)
    supers = None if found.experts is None else find_super_experts(*found.experts, settings.super_expert_quantile,
                                                                   settings.super_expert_fraction, settings.super_expert_depth)
    warnings = list(found.warnings)
    mechanism = Mechanism(lifelines=[], origin=[], anatomy=[], attribution=[], experts=[], super_experts=supers,
                          birth_state=None, token_values=None)
    causal = Causal()
    folder = place.folder if place is not None else Path(".")
    explained = bool(found.findings.dims)
    verified = settings.verify and not lm.adapter.encoder
    events = EventPass(lm=lm, findings=found.findings, inputs=found.inputs, settings=settings, warnings=warnings, lines=[],
                       view={}, events=[], birth=None)  # nothing to explain, where nothing is massive
    if explained:  # two more passes, over the kept texts (and with verification the evaluation text)
        events = streamed_lifelines(streamed, found.findings, found.inputs, settings, warnings, folder)
    events.super_experts = supers
    if not explained:  # no mechanism pass to take the valley's readings and the Q/K concentration from: one pass over their texts
        events.readings, events.qk = streamed_valley(streamed, found.findings, found.inputs, folder)
    readings, qk = events.readings, events.qk
    # the trigger in the events' pass, on the blocks up to its last kept loaded where they fit
    trigger = events.trigger = streamed_trigger(streamed, events, settings, found.corpus.windows, place or StreamPlace(folder=folder))
    if explained and not verified:
        mechanism = explain_streamed(streamed, events, folder)
    if verified:  # the Q/K disruption test too, of the dims the concentration found massive
        what = "mechanism and interventions" if explained else "interventions"
        advance = (progress or _silent)(f"streamed {what}: {n_layers} blocks", n_layers)
        mechanism, causal, qk.disruption = streamed_causal(
            streamed, events, settings, _eval_text(settings), place or StreamPlace(folder=folder),
            on_block=lambda layer: advance(f"streamed {what}: block {layer + 1} of {n_layers}"))
    warnings += trigger.warnings()
    texts = valley_texts(found.findings, found.inputs)
    rate = causal.attention.rate if causal.attention is not None else None
    valley = compression_valley(readings, texts, n_layers, found.findings.dims, rate)
    passes = ["the corpus pass", "the lifelines and the compression valley" if explained else "the compression valley"]
    passes += [" and ".join((["the mechanism"] if explained else []) + (["the interventions"] if verified else []))]
    passes = [p for p in passes if p]
    causal.default = why
    info = model_info(lm)
    info.weights_sha256 = weights_sha256(lm.model, streamed.samples)  # every block's sample, taken as it was loaded
    info.streamed = True
    report = Report(model=info, corpus=found.corpus, settings=settings.replace(verify=verified),
                    findings=found.findings, mechanism=mechanism, trigger=trigger.found, causal=causal,
                    deploy=Deploy(precision=headroom(found.findings.layers)), conclusion=[],
                    warnings=warnings, versions=_versions(), valley=valley, qk=qk)
    if settings.quant and found.findings.dims:
        report.deploy.quantization = quantize_streamed(streamed, build_protect(report), settings, place or StreamPlace(folder=folder),
                                                       progress=progress, earlier=quantization)
        if report.deploy.quantization is not quantization:  # measured, not kept
            passes.append("the quantization's massive tokens and settings")
    reads = streamed.checkpoint.bytes_read / max(size, 1)
    report.warnings.append(f"streamed model: the checkpoint was read {reads:.2g} times ({in_bytes(streamed.checkpoint.bytes_read)}: "
                           f"{', '.join(passes)})")
    report.conclusion = conclude(report)
    return report


@guarded
def quantize_streamed(streamed: StreamedModel, protect: Protect, settings: ScanSettings, place: StreamPlace,
                      eval_text: str | None = None, progress: Progress | None = None,
                      earlier: Quantization | None = None) -> Quantization:
    """``quantize`` of a model read block by block (``analysis.deploy.stream``): the same sweep, every setting a lane
    of one pass over the blocks, after a pass to the last protected block that marks the massive tokens; ``earlier``
    (a saved sweep) kept where it was measured on the same inputs, with no pass at all."""
    if eval_text is None and settings.eval_file is not None:
        eval_text = read_eval_file(settings.eval_file)
    n_layers = len(streamed.lm.adapter.blocks(streamed.lm.model))
    bars: dict[str, Callable[..., None]] = {}

    def on_block(name: str, layer: int) -> None:
        if name not in bars:
            bars[name] = (progress or _silent)(f"streamed quantization, {name}: {n_layers} blocks", n_layers)
        bars[name](f"streamed quantization, {name}: block {layer + 1} of {n_layers}")

    return streamed_quantization(streamed, protect, sweep_options(settings, eval_text), place, on_block, earlier)


@guarded
@torch.no_grad()
def profile(
    model: LoadedModel | nn.Module | str | None = None,
    texts: Sequence[str] | Corpus | None = None,
    settings: ScanSettings | None = None,
    *,
    report: Report | None = None,
    tokenizer=None,
    progress: Progress | None = None,
    **options,
) -> Profile:
    """What ``model``'s massive activations are, in a form other tools use (``Profile``): per block the massive dims,
    the threshold, the rules that predict their carriers and the outlier severity, on ``texts`` (None: the built-in
    sentences). Each block's threshold is the scan's: from ``report`` (a saved report of this model, whose texts are
    used when ``texts`` is None), else from the corpus pass of a scan (``settings`` and ``options`` as for ``scan``:
    ``min_abs``, ``min_ratio``, ``batch_size``, ``max_length``). Then one more batched pass counts each block's
    carriers; memory does not grow with the corpus.

    Args:
        model: As for ``scan``: a name (None: the embedded default), a loaded model, or an ``nn.Module`` with
            ``tokenizer``.
        texts: The texts to count on, a list of strings; None for ``report``'s texts, or without ``report`` the
            built-in sentences.
        settings: A ``ScanSettings`` (default: the CLI's defaults).
        report: A ``Report`` of this model (e.g. from ``massact.report.schema.load_report``), whose criterion,
            medians and ``max_length`` are used instead of a new corpus pass.
        tokenizer: The tokenizer of an ``nn.Module`` ``model``.
        progress: Reports the passes' progress; see ``Progress``.
        **options: Single fields of ``settings`` to change (``min_abs=50``).

    Returns:
        The profile, one ``BlockProfile`` per block.

    Raises:
        TypeError: An argument is not of a kind profile takes (``report`` a folder name instead of a ``Report``).
        ValueError: ``texts`` is empty.
        UsageError: Bad input a user can fix (a ``ValueError``), or ``report`` was made from another model.
        ModelCodeError: The model's own forward pass failed (a ``UsageError``).
    """
    check_arguments(model, texts, tokenizer, settings)
    if report is not None and not isinstance(report, Report):  # a report's folder is read by load_report, not here
        raise TypeError(f"report must be a Report (e.g. massact.report.schema.load_report(folder)), not {type(report).__name__}")
    settings = (settings or ScanSettings()).replace(**options).check()
    lm = _as_loaded(model, tokenizer, settings.dtype, settings.device)
    progress = progress or _silent
    if report is not None:
        check_report_model(report, lm, "the report")
        if texts is None:
            texts = report.corpus.spec
        criterion = report.findings.criterion
        settings = settings.replace(max_length=report.settings.max_length, min_abs=criterion.min_abs, min_ratio=criterion.min_ratio)
    corpus = texts if isinstance(texts, Corpus) else Corpus(texts=tuple(texts) if texts is not None else ())
    total = corpus.check()
    if report is None:
        found = detect_stage(lm, corpus, total, settings.replace(verify=False), None, progress)
        findings = found.findings
    else:
        findings = report.findings
    medians, criterion = findings.medians, findings.criterion
    # each block's median per stream of its output: with hyper-connections each stream's own, as the scan judged them
    names = [f"s{k}" for k in range(lm.adapter.streams(lm.config))] if lm.adapter.hyper is not None else [""]
    per_stream = [list(block) for block in zip(*(findings.stream_medians(name) for name in names))]
    advance = progress("profile: forward passes over the texts", total if settings.max_length is None else None)
    stream = (window.ids for window in windows(lm, corpus, settings.max_length))
    counts = count_carriers(lm, stream, per_stream, criterion, settings.batch_size, advance)
    return build_profile(lm, counts, medians, criterion, corpus.describe())


@dataclass(kw_only=True)
class Detection:
    """What the corpus pass found: the ``findings`` every later stage reads, the kept windows' token ids
    (``inputs``, by window index), the corpus's description and the warnings so far."""

    findings: Findings
    inputs: dict[int, torch.Tensor]
    corpus: CorpusInfo
    warnings: list[str]
    experts: tuple[torch.Tensor, torch.Tensor] | None = None  # each expert's largest |output|: routed, shared


def checkpointing(lm: LoadedModel, settings: ScanSettings, path: Path | None, resume: bool) -> Checkpointing | None:
    """Where the corpus pass saves its state (None: nowhere), and the identity a resumed pass must match."""
    if path is None:
        return None
    identity = scan_identity(lm, top_k=settings.top_k, min_abs=settings.min_abs, min_ratio=settings.min_ratio,
                             max_length=settings.max_length, batch_size=settings.batch_size)
    return Checkpointing(path=path, every=settings.checkpoint_every, resume=resume, identity=identity)


def detect_stage(lm: LoadedModel, corpus: Corpus, total: int, settings: ScanSettings, state: Checkpointing | None,
                 progress: Progress) -> Detection | None:
    """The corpus pass (streamed, batched, resumable through ``state``, shared by several processes), then the
    massive entries and dims. None on every process but the first of a multi-process launch."""
    # Without --max-length a window is a text, so the number of texts is the number of forward passes.
    advance = progress("forward passes over the texts", total if settings.max_length is None else None)
    counts = Counts()
    stream = (window.ids for window in windows(lm, corpus, settings.max_length, counts))
    layer_scan = scan_layers(lm, stream, on_window=lambda _: advance(), batch_size=settings.batch_size, state=state)
    rank, world = distributed_rank()
    if world > 1:
        release_processes()  # the statistics are merged and no collective follows: a process may now end cleanly
    if rank != 0:
        return None
    return detection(lm, corpus, counts, layer_scan, settings)


def detection(lm: LoadedModel, corpus: Corpus, counts: Counts, layer_scan: LayerScan, settings: ScanSettings) -> Detection:
    """The massive entries and dims of a finished corpus pass ``layer_scan`` (``counts``: the texts and windows it
    read), and the windows its statistics point at."""
    # Keep only the windows the statistics point at (and the first few, for the input-dependence check).
    wanted = {int(t) for top in layer_scan.tops if top.labels is not None for t in top.labels[:, 0].tolist()}
    texts, inputs, tokens = collect(lm, corpus, settings.max_length, wanted | set(range(MAX_INPUTS)))
    criterion = settings.criterion
    # The sketch's bound at the medians found: 2**-11 unless one lies below float16's normal range.
    criterion.median_rel_error = max([LogHistogram.error_at(m) for m in layer_scan.medians() if m > 0],
                                     default=LogHistogram.rel_error)
    layers = layer_stats(layer_scan, tokens, settings.top_k)
    massive = detect(layer_scan, tokens, criterion)
    split = counts.split_warning(settings.max_length)
    warnings = scan_warnings(layer_scan, massive) + ([split] if split else [])
    n_tokens = round(layer_scan.histograms[0].total / lm.config.hidden_size)
    corpus_info = CorpusInfo(source=corpus.describe(), texts=counts.texts, windows=counts.windows, tokens=n_tokens, spec=corpus)
    findings = Findings(texts=texts, tokens=tokens, criterion=criterion, layers=layers, massive=massive,
                        dims=group_dims(massive, len(layers)))
    return Detection(findings=findings, inputs=inputs, corpus=corpus_info, warnings=warnings, experts=layer_scan.experts)


def mechanism_stage(lm: LoadedModel, found: Detection, settings: ScanSettings, warnings: list[str]) -> Mechanism:
    """Each dim's lifeline over every block, then origin, MLP anatomy and neuron attribution at every block it names,
    a mixture's super experts, the birth block's state on the carrier's text and each dim at every block and token
    (the page's token view); checks that fail their second computation are appended to ``warnings``."""
    findings, inputs = found.findings, found.inputs
    supers = None if found.experts is None else find_super_experts(*found.experts, settings.super_expert_quantile,
                                                                   settings.super_expert_fraction, settings.super_expert_depth)
    if lm.adapter.hyper is not None:
        return _stream_mechanism(lm, findings, inputs, settings, supers, warnings)
    lines = lifelines(lm, findings, inputs)
    events = pick_events(findings.dims, findings.massive, lines)
    origins, anatomies, attributions, experts = explain(lm, events, probe_events(lm, events, inputs), findings, settings, warnings)
    return Mechanism(lifelines=lines, origin=origins, anatomy=anatomies, attribution=attributions, experts=experts,
                     super_experts=supers,
                     birth_state=birth_state(lm, inputs, dims=findings.dims, origin=origins, massive=findings.massive,
                                             tokens=findings.tokens),
                     token_values=token_values(lm, inputs, dims=findings.dims, lifelines=lines))


def _stream_mechanism(lm: LoadedModel, findings: Findings, inputs: dict[int, torch.Tensor], settings: ScanSettings, supers,
                      warnings: list[str]) -> Mechanism:
    """With hyper-connections: each dim's lifeline in its main carrier's stream, and that stream's origin (the terms
    through the write and mixing weights) at every block the lifeline names as a writer and at the block after birth
    (where the mixing carries it on); where that origin's carrier is the MLP, its anatomy and neurons (dense) or its
    experts and their neurons (a mixture), with the write weight into the stream, or the attention's heads; the birth
    block's state and the token view in that stream."""
    lines = stream_lifelines(lm, findings, inputs)
    origins = []
    for line in lines:
        stream = int(line.stream[1:])
        origins += stream_origins(lm, inputs[line.text], line.text, line.position,
                                  [(layer, stream, line.dim) for layer in origin_layers(line)])
    anatomies, attributions, experts, failed = explain_streams(lm, lines, origins, inputs, findings, settings)
    warnings += failed
    state = stream_birth_state(lm, inputs, dims=findings.dims, lifelines=lines, massive=findings.massive, tokens=findings.tokens)
    return Mechanism(lifelines=lines, origin=[], anatomy=anatomies, attribution=attributions, experts=experts, super_experts=supers,
                     birth_state=state, token_values=token_values(lm, inputs, dims=findings.dims, lifelines=lines), streams=origins)


def valley_stage(lm: LoadedModel, found: Detection, causal: Causal) -> CompressionValley:
    """The compression valley on a few kept texts (one batched pass, every block's output tapped), against the birth
    block and, where the causal stage measured it, the sink rate."""
    texts = valley_texts(found.findings, found.inputs)
    readings = read_valley(lm, found.inputs, texts, found.findings)
    rate = causal.attention.rate if causal.attention is not None else None
    return compression_valley(readings, texts, len(found.findings.layers), found.findings.dims, rate)


def causal_stage(lm: LoadedModel, found: Detection, mechanism: Mechanism, settings: ScanSettings, eval_text: str | None,
                 progress: Progress) -> tuple[Causal, list[str]]:
    """With ``settings.verify``: the interventions, the output effects, the attention sinks and the super weights
    zeroed one after another, and the warnings raised. With nothing massive, the attention sinks alone, on each text's
    first token: whether a model grows a sink without a massive activation (gated attention, learned sinks) is a
    finding too."""
    findings, inputs = found.findings, found.inputs
    if not settings.verify:
        return Causal(), []
    text = _eval_text(settings, eval_text)
    if not findings.dims:
        causal = Causal(attention=sink_analysis(lm, inputs, findings, settings.sink_epsilon))
        if mechanism.super_experts is not None and mechanism.super_experts.found:
            causal.expert_pruning = prune_super_experts(lm, inputs, evaluation_for(lm, text, findings, mechanism), findings,
                                                        mechanism, settings)
        return causal, []
    if lm.adapter.encoder and not headless(lm) and lm.tokenizer.mask_token_id is None:
        return Causal(), [NO_MASK_TOKEN]
    # One scoring, its passes shared by the interventions and the super weights.
    evaluation = evaluation_for(lm, text, findings, mechanism)
    causal = Causal(verification=verify_by_intervention(lm, inputs, findings, mechanism, evaluation, progress("interventions", None)))
    causal.attention = sink_analysis(lm, inputs, findings, settings.sink_epsilon, replacement_values(findings.dims, findings.massive))
    advance = progress("super weights, zeroed one by one", None)
    for step in all_super_weights(lm, inputs, evaluation, findings, mechanism, settings):
        causal.super_weights.append(step)
        advance()
    if mechanism.super_experts is not None:  # a mixture of experts: its super experts pruned, against a random control
        causal.expert_pruning = prune_super_experts(lm, inputs, evaluation, findings, mechanism, settings)
    return causal, []


def qk_stage(lm: LoadedModel, found: Detection, settings: ScanSettings, eval_text: str | None) -> QkValues:
    """Massive values in the queries and keys, on the kept texts; with ``settings.verify`` (a causal LM with its
    head), the disruption test on the evaluation text too."""
    scored = settings.verify and not lm.adapter.encoder and not headless(lm)
    return qk_values(lm, found.inputs, _eval_text(settings, eval_text) if scored else None)


@guarded
def deploy_stage(lm: LoadedModel, report: Report, settings: ScanSettings, eval_text: str | None, progress: Progress,
                 earlier: Quantization | None = None) -> Deploy:
    """Float16 and bfloat16 headroom always; with ``settings.quant``, the quantization sweep of the report's own
    protect list, where it found massive dims (``earlier``: a saved sweep, kept where it was measured on the same
    inputs)."""
    deploy = Deploy(precision=headroom(report.findings.layers))
    if settings.quant and report.findings.dims:
        deploy.quantization = quantize(lm, build_protect(report), settings, eval_text, progress, earlier)
    return deploy


@guarded
def quantize(lm: LoadedModel, protect: Protect, settings: ScanSettings, eval_text: str | None = None,
             progress: Progress | None = None, earlier: Quantization | None = None) -> Quantization:
    """The quantization sweep of ``lm`` with ``protect`` held out (``settings.quant_grid``, ``clip_z``, ``block_size``
    and the real ``engines``), on ``eval_text`` (None: the shipped sample); ``earlier`` is kept where it was measured
    on the same inputs."""
    return measure_quantization(lm, protect, eval_text, settings, progress or _silent, earlier)


def check_arguments(model, texts, tokenizer, settings) -> None:
    """A TypeError naming the argument when ``model``, ``texts`` or ``tokenizer`` is not of a kind scan takes (a
    string for ``texts`` would be scanned one character at a time)."""
    if not (model is None or isinstance(model, (LoadedModel, str, os.PathLike)) or
            isinstance(model, nn.Module) and hasattr(model, "config")):
        raise TypeError(f"model must be a model name or path, a LoadedModel or a transformers model, not {type(model).__name__}")
    if isinstance(texts, (str, bytes)) or not (texts is None or isinstance(texts, (Corpus, list, tuple))):
        raise TypeError(f"texts must be a list of strings (e.g. [\"Hello\"]), not {type(texts).__name__}")
    if isinstance(texts, (list, tuple)) and not texts:
        raise ValueError("texts is empty: give at least one text, or None for the built-in sentences")
    for index, text in enumerate(() if texts is None or isinstance(texts, Corpus) else texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a string, not {type(text).__name__}")
    if settings is not None and not isinstance(settings, ScanSettings):
        raise TypeError(f"settings must be a ScanSettings, not {type(settings).__name__}")
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer (e.g. from AutoTokenizer), not {type(tokenizer).__name__}")


def _as_loaded(model, tokenizer, dtype: str, device: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise UsageError("a model object needs its tokenizer: scan(model, texts, tokenizer=...)")
        return wrap(model, tokenizer)
    return load(None if model is None else str(model), dtype=dtype, device=device)


def _eval_text(settings: ScanSettings, eval_text: str | None = None) -> EvalText:
    """The text the causal stage scores on: ``eval_text``, else ``settings.eval_file``, else the shipped sample."""
    if eval_text is None and settings.eval_file is not None:
        eval_text = read_eval_file(settings.eval_file)
    return EvalText(text=eval_text or default_eval_text(),
                    source="massact/data/eval.txt (Declaration of Independence, Gettysburg Address)" if eval_text is None
                    else "--eval-file")


def _versions() -> dict[str, str]:
    import transformers

    return {"massact": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


