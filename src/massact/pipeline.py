"""The whole investigation: scan, detect, find the writer, open the MLP, attribute to neurons and a super weight."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import __version__
from .analysis.causal.embeddings import headless
from .analysis.causal.perplexity import default_eval_text, eval_windows
from .analysis.causal.superweights import all_super_weights
from .analysis.causal.evaluation import evaluation_for
from .analysis.causal.experts import prune as prune_experts
from .analysis.causal.verification import MAX_INPUTS, replacement_values, verify as verify_report
from .analysis.conclusion import conclude
from .analysis.deploy.precision import headroom
from .analysis.deploy.protect import build as build_protect, check_report_model
from .analysis.deploy.quant import measure as measure_quantization
from .analysis.deploy.results import Quantization
from .analysis.detect.results import DimSummary, LayerStats, Massive
from .analysis.detect.resume import scan_identity
from .analysis.detect.scan import detect, distributed_rank, group_dims, layer_stats, release_processes, scan_layers
from .analysis.function.sinks import sink_analysis
from .analysis.mechanism.experts import find as super_experts
from .analysis.mechanism.explain import birth_state, explain, pick_events, token_values
from .analysis.mechanism.lifeline import lifelines
from .analysis.profile import build as profiling
from .analysis.profile.results import Profile
from .analysis.results import CorpusInfo, CorpusSpec, ModelInfo, Report
from .analysis.trigger.trigger import triggers
from .capture.stats import LogHistogram
from .errors import UsageError
from .models.adapters.base import layer_types, weight_out_in
from .models.identity import weights_sha256
from .models.loading import LoadedModel, load, wrap
from .settings import Criterion, ScanSettings
from .texts import Corpus, read_eval_file

CANDIDATES = 512  # largest |a| kept per block; massive entries are a handful, so this bounds nothing real


# progress(stage, total or None) returns the function to call after each step of that stage.
Progress = Callable[[str, "int | None"], Callable[[], None]]


def _silent(stage: str, total: int | None) -> Callable[[], None]:
    return lambda: None


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
    **options,
) -> Report | None:
    """Find the massive activations of ``model`` on ``texts`` and trace each to the block, sublayer, MLP checkpoint,
    neurons and weight that write them. With ``verify``, confirm by intervention and measure the attention sinks
    (perplexity on ``eval_text``, default: ``settings.eval_file``, else the shipped public-domain sample).

    ``model``: a name for ``massact.models.load`` (None: the embedded SmolLM2-135M-Instruct), a loaded model, or an
    ``nn.Module`` with ``tokenizer``. ``texts``: None for the built-in sentences. ``settings``: a ``ScanSettings``
    (default: the CLI's defaults); keyword ``options`` change single fields of it (``top_k=3, verify=True``).
    ``checkpoint``: where the corpus pass saves its merged state every ``settings.checkpoint_every`` batches, and
    ``resume`` continues from it. ``progress``: see ``Progress``. ``quantization``: a saved report's sweep of this
    model, kept (with ``settings.quant``) instead of measured again when this scan would measure it on the same
    inputs (``Quantization.inputs_sha256``): the same protect list, evaluation text, dtype, device and grid.
    Launched as several processes (torchrun, accelerate launch), all share the corpus scan and only rank 0 gets the
    report; the others get None.
    """
    check_arguments(model, texts, tokenizer, settings)
    settings = (settings or ScanSettings()).replace(**options).check()
    if eval_text is None and settings.eval_file is not None:
        eval_text = read_eval_file(settings.eval_file)
    lm = _as_loaded(model, tokenizer, settings.dtype, settings.device)
    corpus = texts if isinstance(texts, Corpus) else Corpus(tuple(texts) if texts is not None else ())
    total = corpus.check()
    if settings.verify:  # an evaluation text too short for perplexity fails now, not after the scan
        eval_windows(lm, eval_text or default_eval_text())
    progress = progress or _silent
    found = detect_stage(lm, corpus, total, settings, checkpoint, resume, progress)
    if found is None:
        return None  # launched as several processes: they shared the scan, the first one explains and reports
    report = mechanism_stage(lm, found, settings)
    trigger_stage(lm, report, found.inputs, settings)
    causal_stage(lm, report, found.inputs, settings, eval_text, progress)
    deploy_stage(lm, report, settings, eval_text, progress, quantization)
    report.conclusion = conclude(report)
    return report


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
    carriers; memory does not grow with the corpus."""
    check_arguments(model, texts, tokenizer, settings)
    settings = (settings or ScanSettings()).replace(**options).check()
    lm = _as_loaded(model, tokenizer, settings.dtype, settings.device)
    progress = progress or _silent
    if report is not None:
        check_report_model(report, lm, "the report")
        spec = report.corpus.spec
        if texts is None:
            texts = Corpus(tuple(spec.texts), spec.file, spec.dataset, spec.max_texts)
        settings = settings.replace(max_length=spec.max_length, min_abs=report.criterion.min_abs, min_ratio=report.criterion.min_ratio)
    corpus = texts if isinstance(texts, Corpus) else Corpus(tuple(texts) if texts is not None else ())
    total = corpus.check()
    if report is None:
        found = detect_stage(lm, corpus, total, settings.replace(verify=False), None, False, progress)
        layers, criterion = found.layers, found.criterion
    else:
        layers, criterion = report.layers, report.criterion
    medians = [stats.median for stats in layers]
    advance = progress("profile: forward passes over the texts", total if settings.max_length is None else None)
    stream = (window.ids for window in windows(lm, corpus, settings.max_length))
    counts = profiling.count(lm, stream, medians, criterion, settings.batch_size, advance)
    return profiling.build(lm, counts, medians, criterion, lm.name, lm.source, corpus.describe(), weights_sha256(lm.model))


@dataclass(kw_only=True)
class Detection:
    """What the corpus pass found: the kept windows (text, ids, tokens by window index), per-block statistics, the
    massive entries and dims, the corpus's description and the warnings so far."""

    texts: dict[int, str]
    inputs: dict[int, torch.Tensor]
    tokens: dict[int, list[str]]
    criterion: Criterion
    layers: list[LayerStats]
    massive: list[Massive]
    dims: list[DimSummary]
    corpus: CorpusInfo
    warnings: list[str]
    experts: tuple[torch.Tensor, torch.Tensor] | None = None  # each expert's largest |output|: routed, shared


def detect_stage(lm: LoadedModel, corpus: Corpus, total: int, settings: ScanSettings, checkpoint: Path | None,
                 resume: bool, progress: Progress) -> Detection | None:
    """The corpus pass (streamed, batched, resumable, shared by several processes), then the massive entries and
    dims. None on every process but the first of a multi-process launch."""
    # Without --max-length a window is a text, so the number of texts is the number of forward passes.
    advance = progress("forward passes over the texts", total if settings.max_length is None else None)
    counts = Counts()
    stream = (window.ids for window in windows(lm, corpus, settings.max_length, counts))
    identity = "" if checkpoint is None else scan_identity(lm, top_k=settings.top_k, min_abs=settings.min_abs,
                                                           min_ratio=settings.min_ratio, max_length=settings.max_length,
                                                           batch_size=settings.batch_size)
    layer_scan = scan_layers(lm, stream, CANDIDATES, lambda _: advance(), settings.batch_size, checkpoint,
                             settings.checkpoint_every, resume, identity)
    rank, world = distributed_rank()
    if world > 1:
        release_processes()  # the statistics are merged and no collective follows: a process may now end cleanly
    if rank != 0:
        return None
    # Keep only the windows the statistics point at (and the first few, for the input-dependence check).
    wanted = {int(t) for top in layer_scan.tops if top.labels is not None for t in top.labels[:, 0].tolist()}
    texts, inputs, tokens = collect(lm, corpus, settings.max_length, wanted | set(range(MAX_INPUTS)))
    criterion = settings.criterion
    # The sketch's bound at the medians found: 2**-11 unless one lies below float16's normal range.
    criterion.median_rel_error = max([LogHistogram.error_at(m) for m in layer_scan.medians() if m > 0],
                                     default=LogHistogram.rel_error)
    layers = layer_stats(layer_scan, tokens, settings.top_k)
    massive = detect(layer_scan, tokens, criterion)
    warnings = _scan_warnings(layer_scan, massive)
    if counts.windows > counts.texts:
        warnings.append(f"{counts.texts} text(s) were split into {counts.windows} windows of at most {settings.max_length} "
                        "tokens; each window is scanned as a text of its own")
    n_tokens = round(layer_scan.histograms[0].total / lm.config.hidden_size)
    spec = CorpusSpec(texts=list(corpus.texts), file=corpus.file, dataset=corpus.dataset, max_texts=corpus.max_texts,
                      max_length=settings.max_length)
    corpus_info = CorpusInfo(source=corpus.describe(), texts=counts.texts, windows=counts.windows, tokens=n_tokens, spec=spec)
    return Detection(texts=texts, inputs=inputs, tokens=tokens, criterion=criterion, layers=layers, massive=massive,
                     dims=group_dims(massive, len(layers)), corpus=corpus_info, warnings=warnings, experts=layer_scan.experts)


def mechanism_stage(lm: LoadedModel, found: Detection, settings: ScanSettings) -> Report:
    """Each dim's lifeline over every block, then origin, MLP anatomy and neuron attribution at every block it names:
    the report, before its trigger, causal checks and deployment figures."""
    medians = [s.median for s in found.layers]
    lines = lifelines(lm, found.dims, found.massive, found.inputs, medians, found.criterion)
    warnings = list(found.warnings)
    origins, anatomies, attributions, experts = explain(lm, pick_events(found.dims, found.massive, lines), found.inputs,
                                                        found.tokens, found.layers, found.criterion, settings.top_neurons,
                                                        warnings)
    supers = None if found.experts is None else super_experts(*found.experts, settings.super_expert_quantile,
                                                              settings.super_expert_fraction, settings.super_expert_depth)
    return Report(model=model_info(lm), corpus=found.corpus, texts=found.texts, tokens=found.tokens,
                  criterion=found.criterion, settings=settings, layers=found.layers, massive=found.massive,
                  dims=found.dims, origin=origins, anatomy=anatomies, attribution=attributions, conclusion=[],
                  warnings=warnings, versions=_versions(), experts=experts, lifeline=lines, super_experts=supers)


def trigger_stage(lm: LoadedModel, report: Report, inputs: dict[int, torch.Tensor], settings: ScanSettings) -> None:
    """Why each dim fires on its carrier: the writing neurons' sources and the chain back toward the token (patched
    when verifying), the birth block's state on the carrier's text, and each dim at every block and token (the page's token view)."""
    report.trigger = triggers(lm, report, inputs, settings.chain_depth, patch=settings.verify)
    report.birth_state = birth_state(lm, report, inputs)
    report.token_values = token_values(lm, report, inputs)


def causal_stage(lm: LoadedModel, report: Report, inputs: dict[int, torch.Tensor], settings: ScanSettings,
                 eval_text: str | None, progress: Progress) -> None:
    """With ``settings.verify``: the interventions, the output effects, the attention sinks and the super weights
    zeroed one after another. With nothing massive, the attention sinks alone, on each text's first token: whether a
    model grows a sink without a massive activation (gated attention, learned sinks) is a finding too."""
    if not settings.verify:
        return
    if not report.dims:
        report.attention = sink_analysis(lm, report, inputs, settings.sink_epsilon)
        if report.super_experts is not None and report.super_experts.found:
            evaluation = evaluation_for(lm, report, eval_text or default_eval_text())
            report.super_experts.pruning = prune_experts(lm, report, inputs, evaluation, settings.sink_epsilon, report.super_experts)
        return
    if lm.adapter.encoder and not headless(lm) and lm.tokenizer.mask_token_id is None:
        report.warnings.append("verification skipped: the tokenizer has no mask token, so the masked-LM loss cannot be measured")
        return
    source = "massact/data/eval.txt (Declaration of Independence, Gettysburg Address)" if eval_text is None else "--eval-file"
    text = eval_text or default_eval_text()
    evaluation = evaluation_for(lm, report, text)  # one scoring, its passes shared by the interventions and super weights
    report.verification = verify_report(lm, report, inputs, text, source, progress("interventions", None), evaluation)
    report.attention = sink_analysis(lm, report, inputs, settings.sink_epsilon, replacement_values(report))
    report.super_weights = all_super_weights(lm, report, inputs, text, settings.super_weight_steps,
                                             progress("super weights, zeroed one by one", None), evaluation)
    if report.super_experts is not None:  # a mixture of experts: its super experts pruned, against a random control
        report.super_experts.pruning = prune_experts(lm, report, inputs, evaluation, settings.sink_epsilon, report.super_experts)


def deploy_stage(lm: LoadedModel, report: Report, settings: ScanSettings, eval_text: str | None, progress: Progress,
                 earlier: Quantization | None = None) -> None:
    """Float16 and bfloat16 headroom always; with ``settings.quant``, the quantization sweep (``earlier`` where it
    was measured on the same inputs)."""
    report.precision = headroom(report.layers)
    if settings.quant and report.dims:
        report.quantization = measure_quantization(lm, build_protect(report), eval_text, settings.quant_grid,
                                                   settings.clip_z, settings.block_size, progress, earlier, tuple(settings.engines))


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
    context = getattr(lm.config, "max_position_embeddings", None)
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
    context = getattr(lm.config, "max_position_embeddings", None)
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


def model_info(lm: LoadedModel) -> ModelInfo:
    config = lm.config
    n_layers = len(lm.adapter.blocks(lm.model))
    sparse = next((layer for layer in range(n_layers) if lm.at(layer).moe is not None), None)
    if sparse is not None:  # one expert's width
        moe = lm.at(sparse).moe
        down = lm.adapter.module(lm.model, sparse, f"{moe.block}.{moe.experts.path}").down_proj
        d_mlp = down.shape[-2] if moe.experts.transposed else down.shape[-1]
    else:
        d_mlp = weight_out_in(lm.adapter.module(lm.model, 0, lm.adapter.mlp_down)).shape[1]
    return ModelInfo(
        name=lm.name,
        architecture=type(lm.model).__name__,
        family=lm.adapter.family,
        n_layers=n_layers,
        d_model=config.hidden_size,
        d_mlp=d_mlp,
        n_heads=config.num_attention_heads,
        gated=lm.adapter.gated or sparse is not None,  # experts are gated MLPs
        dtype=str(lm.dtype).removeprefix("torch."),
        device=str(lm.device),
        source=lm.source,
        stream=lm.adapter.stream,
        notes=lm.adapter.notes,
        weights_sha256=weights_sha256(lm.model),
        blocks=block_kinds(lm),
    )


def block_kinds(lm: LoadedModel) -> list[str]:
    """Per block, its mixer, its kind of attention (the config's layer types, where they vary) and whether it sees
    positions; [] where every block is the same."""
    words = {"attention": "attention", "linear": "linear attention", "conv": "convolution"}
    kinds = []
    for layer in range(len(lm.adapter.blocks(lm.model))):
        here = lm.at(layer)
        detail = [layer_types(lm.config, layer).replace("_attention", "")] if here.mixer == "attention" else []
        detail += [] if here.positions else ["no positions"]
        detail = [d for d in detail if d]
        kinds.append(words[here.mixer] + (f" ({', '.join(detail)})" if detail else ""))
    return kinds if len(set(kinds)) > 1 else []


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


