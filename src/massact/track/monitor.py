"""Massive activations during training, with no checkpoint on disk: every N steps, scan a fixed probe set with the
streaming scan (eval mode, no grad, the training mode restored, the weights untouched) and record per block the
largest |a| (top1), the median |a|, their ratio, the count of massive entries and the top dim.

``Monitor.step(model, step)`` serves a custom loop; ``MassactCallback`` a ``transformers.Trainer``, logging the figures
through the trainer's own log so that ``report_to`` (TensorBoard, W&B) receives them. Both append one JSON line per
measurement to a file that ``massact track FILE.jsonl`` draws as a timeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..analysis.detect.scan import LayerScan, scan_layers
from ..analysis.track.results import MonitorBlock, MonitorRecord
from ..models.adapters import adapter_for
from ..models.failures import guarded
from ..models.loading import LoadedModel
from ..report.schema import write_monitor_line
from ..settings import Criterion
from ..texts import DEFAULT_TEXTS

EVERY = 100  # steps between two measurements by default: the probe scan then costs well under 2% of training time


def block_figures(scan: LayerScan, criterion: Criterion) -> list[dict]:
    """Per block: top1 |a|, median |a|, top1 / median, how many entries are massive, the dim of the largest."""
    figures = []
    for layer, (median, top) in enumerate(zip(scan.medians(), scan.tops)):
        items = top.items()
        top1 = abs(items[0][0]) if items else 0.0
        ratio = top1 / median if median > 0 else math.nan
        figures.append(asdict(MonitorBlock(layer=layer, top1=_number(top1), median=_number(median), ratio=_number(ratio),
                                           massive=sum(bool(criterion.is_massive(value, median)) for value, _ in items),
                                           top_dim=items[0][1][2] if items else None)))
    return figures


def _number(value: float) -> float | None:
    """JSON has no inf or nan (a float16 overflow, a zero median): None instead."""
    return value if math.isfinite(value) else None


def log_figures(record: dict) -> dict[str, float]:
    """A record as flat scalars for a trainer's log: ``massact/block_03/ratio`` and so on."""
    flat = {}
    for block in record["blocks"]:
        for key in ("top1", "median", "ratio", "massive", "top_dim"):
            if block[key] is not None:
                flat[f"massact/block_{block['layer']:02d}/{key}"] = block[key]
    return flat


class Monitor:
    """Scans ``texts`` (default: the built-in sentences) every ``every`` steps; ``path``: the JSONL file appended to
    (None: nothing written). The massive test is ``criterion``'s (default |a| >= 100 and >= 1000 x the median).
    Every argument is checked here, so that a bad one fails before training starts, not in the middle of it."""

    def __init__(self, tokenizer, texts: Sequence[str] = DEFAULT_TEXTS, every: int = EVERY, path: str | Path | None = None,
                 criterion: Criterion | None = None, batch_size: int = 8):
        _count("every", every)
        _count("batch_size", batch_size)
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or \
                not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a non-empty list of strings")
        if criterion is not None and not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a massact Criterion, not {type(criterion).__name__}")
        self.tokenizer, self.every, self.batch_size = tokenizer, every, batch_size
        self.texts = list(texts)
        self.ids = [tokenizer(text, return_tensors="pt").input_ids for text in self.texts]
        empty = next((i for i, ids in enumerate(self.ids) if ids.shape[1] == 0), None)
        if empty is not None:
            raise ValueError(f"texts[{empty}] has no tokens")
        self.path = None if path is None else Path(path)
        if self.path is not None:
            _check_appendable(self.path)
        self.criterion = criterion or Criterion()

    def step(self, model: nn.Module, step: int) -> dict | None:
        """At a multiple of ``every``: measure, append the record to the file and return it; else None. The model is
        checked at every call, so that a wrong one fails at once, not at the first multiple of ``every``."""
        _check_model(model)
        _count("step", step, least=0)
        if step % self.every:
            return None
        record = self.measure(model, step)
        self.write(record)
        return record

    @guarded
    @torch.no_grad()
    def measure(self, model: nn.Module, step: int) -> dict:
        """The record of ``model`` now: scanned in eval mode without grad, then every module put back in the mode it
        was in (a frozen submodule in eval mode inside a model in train mode stays in eval mode)."""
        adapter = _check_model(model)
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            lm = LoadedModel(model, self.tokenizer, adapter, "monitor")
            scan = scan_layers(lm, iter(self.ids), batch_size=self.batch_size)  # as many kept per block as the scan keeps
        finally:
            for module, training in modes:
                module.training = training
        return asdict(MonitorRecord(step=int(step), texts=len(self.texts), blocks=block_figures(scan, self.criterion),
                                    criterion=Criterion(min_abs=self.criterion.min_abs, min_ratio=self.criterion.min_ratio)))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:  # one whole line per record: a reader never sees half
            file.write(write_monitor_line(record) + "\n")


class MassactCallback(TrainerCallback):
    """A ``transformers.TrainerCallback``: at the end of every ``every``-th optimizer step, the probe scan. Attach it
    with ``MassactCallback.attach(trainer, ...)`` so it can log through ``trainer.log`` (and so ``report_to``); given
    to a Trainer otherwise, it only writes the JSONL file. Only the main process writes the file."""

    def __init__(self, tokenizer, texts: Sequence[str] = DEFAULT_TEXTS, every: int = EVERY, path: str | Path | None = None,
                 criterion: Criterion | None = None, trainer=None):
        self.monitor = Monitor(tokenizer, texts, every, path, criterion)
        self.trainer = trainer
        self.records: list[dict] = []

    @classmethod
    def attach(cls, trainer, texts: Sequence[str] = DEFAULT_TEXTS, every: int = EVERY, path: str | Path | None = None,
               criterion: Criterion | None = None) -> MassactCallback:
        """A callback on ``trainer``, with its tokenizer, logging through it."""
        callback = cls(trainer.processing_class, texts, every, path, criterion, trainer)
        trainer.add_callback(callback)
        return callback

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.monitor.every:
            return
        record = self.monitor.measure(model, state.global_step)
        self.records.append(record)
        if state.is_world_process_zero:
            self.monitor.write(record)
        if self.trainer is not None:
            wanted = control.should_log  # trainer.log clears it: the trainer's own log of this step (the loss) must stay
            self.trainer.log(log_figures(record))
            control.should_log = wanted


def _count(name: str, value, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, not {value!r}")


def _check_model(model) -> object:
    """The model's adapter; a TypeError naming the argument when ``model`` is not a supported transformers model."""
    from ..errors import UsageError

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (with a config), not {type(model).__name__}")
    try:
        return adapter_for(model.config)
    except UsageError as error:
        raise TypeError(f"model: {error}") from None


def _check_appendable(path: Path) -> None:
    """A ValueError naming ``path`` when the monitor could not append to it: tried once now (a file made for the try is
    removed again), not at the first record in the middle of training."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ValueError(f"path {str(path)!r} cannot be appended to: {error.strerror or error}") from None
    if not existed:
        path.unlink(missing_ok=True)


def read_journals(paths: Sequence[Path]) -> list[dict]:
    """The records of one or more monitor JSONL files, by step, as one timeline: refused in one line where they cannot
    be one (records of different block counts or criteria, a step recorded twice)."""
    from ..errors import UsageError

    found = [(path, record) for path in paths for record in read_records(path)]
    first_path, first = found[0]
    for path, record in found:
        if len(record["blocks"]) != len(first["blocks"]):
            raise UsageError(f"{path}: step {record['step']} has {len(record['blocks'])} blocks, {first_path} step {first['step']} "
                             f"{len(first['blocks'])}: the records are of different models")
        if _criterion(record) != _criterion(first):
            raise UsageError(f"{path}: step {record['step']} was measured with another criterion ({_criterion(record)}) than "
                             f"{first_path} step {first['step']} ({_criterion(first)}); track them apart")
    seen: dict[int, Path] = {}
    for path, record in found:
        if record["step"] in seen:
            raise UsageError(f"step {record['step']} is recorded twice ({seen[record['step']]} and {path}): a track needs one "
                             "record per step (a restarted run appending to the same file? split the file)")
        seen[record["step"]] = path
    return sorted((record for _, record in found), key=lambda r: r["step"])


def _criterion(record: dict) -> str:
    return f"|a| >= {record['criterion']['min_abs']:g} and >= {record['criterion']['min_ratio']:g}x the median"


def read_records(path: Path) -> list[dict]:
    """A monitor's JSONL file, every line checked (a bad one is one line naming the line and field), by step. A
    last line cut short by a kill mid-write is skipped."""
    from ..errors import UsageError
    from ..report.schema import read_monitor_line

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        # Checked against the dataclasses the monitor writes (the one schema), kept as the plain record it wrote.
        record = read_monitor_line(line, f"{path}:{number}")
        if record is None:
            if number == len(lines):
                continue  # the line being written when training stopped
            raise UsageError(f"{path}:{number}: not a JSON line")
        record = asdict(record)
        if [block["layer"] for block in record["blocks"]] != list(range(len(record["blocks"]))):
            raise UsageError(f"{path}:{number}: field blocks must list blocks 0, 1, 2, ... in order")
        records.append(record)
    if not records:
        raise UsageError(f"{path}: no monitor records")
    return sorted(records, key=lambda r: r["step"])


def timeline(records: list[dict], spec: str):
    """Monitor records as a track: each record a checkpoint of the timeline (no report, no sink, no super weight)."""
    from ..analysis.track.align import align, monitor_state

    states = [monitor_state(record, spec) for record in records]
    listed = [{b.top_dim: b.top1 for b in state.blocks if b.top_dim is not None} for state in states]
    criterion = records[0].get("criterion", {})
    return align(states, {"monitor": spec, "probe texts": records[0].get("texts"), **criterion}, listed)
