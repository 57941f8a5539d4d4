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
from .errors import UsageError
from .models.adapters.base import weight_out_in
from .models.loading import LoadedModel, load, wrap
from .texts import Corpus
from .analysis.function.sinks import SINK_EPSILON, sink_analysis
from .analysis.conclusion import conclude
from .analysis.mechanism.explain import birth_state, explain, pick_events
from .analysis.mechanism.lifeline import lifelines
from .analysis.causal.perplexity import default_eval_text, eval_windows
from .analysis.results import CorpusInfo, CorpusSpec, ModelInfo, Report
from .settings import Criterion, check_options
from .analysis.detect.results import Massive
from .analysis.detect.resume import scan_identity
from .analysis.causal.superweights import MAX_STEPS, all_super_weights
from .analysis.trigger.trigger import CHAIN_DEPTH, triggers
from .analysis.deploy.precision import headroom
from .analysis.deploy.protect import build as build_protect
from .analysis.deploy.quant import measure as measure_quantization
from .analysis.detect.scan import detect, distributed_rank, group_dims, layer_stats, release_processes, scan_layers
from .analysis.causal.verification import MAX_INPUTS, replacement_values, verify as verify_report

CANDIDATES = 512  # largest |a| kept per block; massive entries are a handful, so this bounds nothing real


# progress(stage, total or None) returns the function to call after each step of that stage.
Progress = Callable[[str, "int | None"], Callable[[], None]]


def _silent(stage: str, total: int | None) -> Callable[[], None]:
    return lambda: None


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
    chain_depth: int = CHAIN_DEPTH,
    super_weight_steps: int = MAX_STEPS,
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
    sink_epsilon: float = SINK_EPSILON,
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
    The mechanism of each dim: its lifeline over every block, the trigger of its writing neurons (a chain of
    ``chain_depth`` links back toward the token) and, with ``verify``, the trigger's sources patched and up to
    ``super_weight_steps`` super weights zeroed one after another.
    ``sink_epsilon``: a head is a sink head when its average attention on a sink token exceeds it (Gu et al. 2024).
    With ``quant``, also measure what weight and activation quantization do (``massact.analysis.quant``; grid
    ``quant_grid``, clipping z-score ``clip_z``, flat block size ``block_size``).
    Launched as several processes (torchrun, accelerate launch), all share the corpus scan and only rank 0 gets the
    report; the others get None.
    """
    check_arguments(model, texts, tokenizer)
    check_options(top_k=top_k, min_abs=min_abs, min_ratio=min_ratio, top_neurons=top_neurons, chain_depth=chain_depth,
                  super_weight_steps=super_weight_steps, batch_size=batch_size, max_length=max_length,
                  checkpoint_every=checkpoint_every, sink_epsilon=sink_epsilon, clip_z=clip_z, block_size=block_size)
    lm = _as_loaded(model, tokenizer, dtype, device)
    corpus = texts if isinstance(texts, Corpus) else Corpus(tuple(texts) if texts is not None else ())
    total = corpus.check()
    if verify:  # an evaluation text too short for perplexity fails now, not after the scan
        eval_windows(lm, eval_text or default_eval_text())
    criterion = Criterion(min_abs=min_abs, min_ratio=min_ratio)

    progress = progress or _silent
    # Without --max-length a window is a text, so the number of texts is the number of forward passes.
    advance = progress("forward passes over the texts", total if max_length is None else None)
    counts = Counts()
    stream = (window.ids for window in windows(lm, corpus, max_length, counts))
    identity = "" if checkpoint is None else scan_identity(lm, top_k=top_k, min_abs=min_abs, min_ratio=min_ratio,
                                                           max_length=max_length, batch_size=batch_size)
    layer_scan = scan_layers(lm, stream, CANDIDATES, lambda _: advance(), batch_size, checkpoint, checkpoint_every, resume,
                             identity)
    rank, world = distributed_rank()
    if world > 1:
        release_processes()  # the statistics are merged and no collective follows: a process may now end cleanly
    if rank != 0:
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
    spec = CorpusSpec(texts=list(corpus.texts), file=corpus.file, dataset=corpus.dataset, max_texts=corpus.max_texts, max_length=max_length)
    corpus_info = CorpusInfo(source=corpus.describe(), texts=counts.texts, windows=counts.windows, tokens=n_tokens, spec=spec)

    lines = lifelines(lm, dims, massive, inputs, [s.median for s in layers], criterion)
    origins, anatomies, attributions, experts = explain(lm, pick_events(dims, massive, lines), inputs, tokens, layers, criterion,
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
        lifeline=lines,
    )
    report.trigger = triggers(lm, report, inputs, chain_depth, patch=verify)
    report.birth_state = birth_state(lm, report, inputs)
    if verify and report.dims and lm.adapter.encoder and lm.tokenizer.mask_token_id is None:
        report.warnings.append("verification skipped: the tokenizer has no mask token, so the masked-LM loss cannot be measured")
    elif verify and report.dims:
        source = "massact/data/eval.txt (Declaration of Independence, Gettysburg Address)" if eval_text is None else "--eval-file"
        report.verification = verify_report(lm, report, inputs, eval_text or default_eval_text(), source,
                                            progress("interventions", None))
        report.attention = sink_analysis(lm, report, inputs, sink_epsilon, replacement_values(report))
    if report.verification is not None:
        report.super_weights = all_super_weights(lm, report, inputs, eval_text or default_eval_text(), super_weight_steps,
                                                 progress("super weights, zeroed one by one", None))
    report.precision = headroom(report.layers)
    if quant and report.dims:
        report.quantization = measure_quantization(lm, build_protect(report), eval_text, quant_grid, clip_z, block_size, progress)
    report.conclusion = conclude(report)
    if report.attention is not None and report.attention.dependence:
        report.conclusion.append(f"Attention sink: {report.attention.dependence}.")
    return report


def check_arguments(model, texts, tokenizer) -> None:
    """A TypeError naming the argument when ``model``, ``texts`` or ``tokenizer`` is not of a kind scan takes (a
    string for ``texts`` would be scanned one character at a time)."""
    if not (model is None or isinstance(model, (LoadedModel, str, os.PathLike)) or
            isinstance(model, nn.Module) and hasattr(model, "config")):
        raise TypeError(f"model must be a model name or path, a LoadedModel or a transformers model, not {type(model).__name__}")
    if isinstance(texts, (str, bytes)) or not (texts is None or isinstance(texts, (Corpus, list, tuple))):
        raise TypeError(f"texts must be a list of strings (e.g. [\"Hello\"]), not {type(texts).__name__}")
    for index, text in enumerate(() if texts is None or isinstance(texts, Corpus) else texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a string, not {type(text).__name__}")
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


