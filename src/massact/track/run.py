"""Scan every checkpoint of a track and align them: one model in memory at a time, each checkpoint's full report in
its own folder, finished checkpoints never redone, and several processes sharing the checkpoints out.

Under ``torchrun`` or ``accelerate launch`` process r of n scans checkpoints r, r + n, r + 2n, ... (each on its own
device, as a single-process scan), waits for the others, and process 0 aligns the reports and writes the track.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from ..analysis.results import Report
from ..analysis.track import align
from ..analysis.track.results import CheckpointState, Track
from ..errors import UsageError
from ..launch import VARIABLES, launch
from ..settings import ScanSettings
from ..texts import Corpus
from .specs import Checkpoint, describe


def folder_name(checkpoint: Checkpoint, index: int) -> str:
    """The checkpoint's report folder: ``step-<step>`` where the step is known, else its position and the spec's name."""
    from ..report.files import slug

    if checkpoint.step is not None:
        return f"step-{checkpoint.step:08d}"
    return f"{index:03d}-{slug(checkpoint.spec)}"


def folders(checkpoints: Sequence[Checkpoint], out: Path) -> list[Path]:
    names = [folder_name(c, i) for i, c in enumerate(checkpoints)]
    if len(set(names)) < len(names):  # two Trainer directories with the same steps: keep both apart
        names = [f"{i:03d}-{name}" for i, name in enumerate(names)]
    return [out / name for name in names]


def run(checkpoints: Sequence[Checkpoint], texts: Corpus, settings: ScanSettings, out: Path, log: Callable[[str], None],
        progress=None, formats: set[str] | None = None) -> Track | None:
    """Scan the checkpoints not done yet (this process's share of them) on the same ``texts`` with the same
    ``settings``, then align every report into the track. Returns None in every process but the first of a
    multi-process launch."""
    from ..report.files import FORMATS

    rank, world = launch()
    places = folders(checkpoints, out)
    scanned: dict[Path, Report] = {}  # reports made here need no reading back
    for index, (checkpoint, folder) in enumerate(zip(checkpoints, places)):
        if index % world != rank:
            continue
        where = f"checkpoint {index + 1}/{len(checkpoints)} ({align.label(checkpoint.step, checkpoint.spec)})"
        if (folder / "report.json").is_file():
            check_done(folder, checkpoint, texts, settings)
            log(f"{where}: already done, in {folder}")
            continue
        log(f"{where}: scanning")
        scanned[folder] = _scan_one(checkpoint, texts, settings, folder, progress, (formats or set(FORMATS)) | {"json"})
    if world > 1:
        wait_for_all()
    if rank != 0:
        return None
    reports = [scanned[folder] if folder in scanned else read_report(folder) for folder in places]
    _check_shapes(checkpoints, reports)
    states = [_state(report, c, folder) for c, report, folder in zip(checkpoints, reports, places)]
    described = {"texts": texts.describe(), **asdict(settings)}
    track = align.align(states, described, [align.listed_values(report.findings.layers) for report in reports])
    if len(checkpoints) == 2:
        track.diff = align.diff(states[0], states[1], super_weight_matrices(checkpoints, states, track.warnings))
    return track


def _state(report: Report, checkpoint: Checkpoint, folder: Path) -> CheckpointState:
    """A checkpoint's report as the track sees it (``align.summarize`` on its fields)."""
    state = align.summarize(report.findings, report.mechanism, report.causal.attention, report.deploy.precision, checkpoint.step,
                            checkpoint.spec)
    state.report = folder.name
    return state


def _scan_one(checkpoint: Checkpoint, texts: Corpus, settings: ScanSettings, folder: Path, progress, formats: set[str]) -> Report:
    from ..models.loading import load

    lm = load(checkpoint.target, dtype=settings.dtype, device=settings.device, log=lambda _: None)
    lm.name = checkpoint.spec
    try:
        return scan_into(lm, texts, settings, folder, progress, formats)
    finally:  # one model in memory at a time
        del lm
        free()


def scan_into(lm, texts: Corpus, settings: ScanSettings, folder: Path, progress, formats: set[str]) -> Report:
    """The loaded model scanned as one process (whatever the launch), its report written in ``folder``."""
    from ..pipeline import scan
    from ..report.files import write_report

    with single_process():
        report = scan(lm, texts, settings, progress=progress)
    write_report(report, folder, formats)
    return report


def free() -> None:
    """Give back the memory of a model just dropped (one model in memory at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_report(folder: Path) -> Report:
    """A checkpoint's report.json, checked and typed."""
    from ..report.schema import load_report

    return load_report(folder)


def check_done(folder: Path, checkpoint: Checkpoint, texts: Corpus, settings: ScanSettings) -> None:
    """A report already in the folder counts as done only if it was made from this checkpoint's model (the identity a
    resumed scan checks: its weights, and the super weights it names) with this track's texts and settings (the device
    aside: a checkpoint scanned on a GPU joins one scanned on the CPU). The model is loaded to be compared."""
    from ..analysis.results import check_report_model
    from ..models.loading import load

    saved = read_report(folder)
    check_inputs(saved, folder, texts, settings)
    lm = load(checkpoint.target, dtype=settings.dtype, device=settings.device, log=lambda _: None)
    try:
        check_report_model(saved, lm, str(folder / "report.json"))
    finally:
        del lm
        gc.collect()


def check_inputs(saved: Report, folder: Path, texts: Corpus, settings: ScanSettings) -> None:
    """Refuse, in one line, a saved report made with other texts or settings than ``texts`` and ``settings`` (the
    device aside)."""
    made = {key: value for key, value in asdict(saved.settings).items() if key != "device"}
    wanted = {key: value for key, value in asdict(settings).items() if key != "device"}
    if saved.corpus.spec != texts or made != wanted:
        raise UsageError(f"{folder} holds a report made with other texts or settings; remove it or choose another --out")


def _check_shapes(checkpoints: Sequence[Checkpoint], reports: Sequence[Report]) -> None:
    """The loaded models (GGUF files and hub ids included) are one architecture and shape, or dims cannot be matched."""
    shapes = [(r.model.architecture, r.model.d_model, r.model.n_layers) for r in reports]
    for checkpoint, found in zip(checkpoints, shapes):
        if found != shapes[0]:
            raise UsageError(f"{checkpoint.spec} is another architecture ({describe(found)}) than {checkpoints[0].spec} "
                             f"({describe(shapes[0])}): a track compares checkpoints of one model")


def super_weight_matrices(checkpoints: Sequence[Checkpoint], states, warnings: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For a diff: each matrix holding a super weight of either checkpoint, read from both checkpoints' safetensors
    files (one tensor at a time, no model loaded)."""
    names = {d.super_weight.matrix for state in states for d in state.dims if d.super_weight is not None}
    found = {}
    for name in sorted(names):
        pair = [read_tensor(checkpoint, name) for checkpoint in checkpoints]
        if pair[0] is None or pair[1] is None or pair[0].shape != pair[1].shape:
            warnings.append(f"{name}: not found with the same shape in both checkpoints' weights; its change is not measured")
            continue
        found[name] = (pair[0], pair[1])
    return found


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor | None:
    """The stored tensor ``name`` (a parameter name of the loaded model) from the checkpoint's safetensors files; the
    files of some checkpoints drop the model's leading prefix ("transformer." of GPT-2), so that is tried too."""
    from safetensors import safe_open

    for file in sorted(model_directory(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in (name, name.split(".", 1)[-1]):
                if key in keys:
                    return handle.get_tensor(key)
    return None


def model_directory(checkpoint: Checkpoint) -> Path:
    """Where the checkpoint's safetensors files are: its folder, the GGUF file's converted cache, the hub snapshot."""
    from ..models.loading import _gguf_dir, _hub_source, split_revision

    if checkpoint.local is not None:
        return checkpoint.local
    if Path(checkpoint.target).is_file():
        return Path(_gguf_dir(Path(checkpoint.target), lambda _: None))
    return Path(_hub_source(*split_revision(checkpoint.target)))


@contextmanager
def single_process():
    """While open, a scan runs as one process even under a multi-process launch: each process scans its own
    checkpoint, so the scan must not split the texts across processes."""
    saved = {key: os.environ.pop(key, None) for key in VARIABLES}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value


def wait_for_all() -> None:
    """Every process of the launch has written its reports: a barrier (gloo, so no device is needed), with a timeout
    long enough for a large model's scan."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    dist.barrier()
    dist.destroy_process_group()
