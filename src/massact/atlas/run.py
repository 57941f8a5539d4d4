"""Scan every model of an atlas and put their reports side by side: the same texts and settings for every model, one
model at a time, each in a process of its own (its memory goes back to the system when the process ends), each
model's full report in its own folder beside its architecture.json, a report already there kept where it was made
from the same model, texts and settings, so that an interrupted atlas resumes at the next model.

This is ``massact track``'s runner over models of any architecture (``track.run``: the folders, the check of a saved
report, the scan as one process, the barrier): under ``torchrun`` or ``accelerate launch`` process r of n surveys
models r, r + n, ..., all wait for each other, and process 0 reads every folder back and writes the atlas.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.atlas.results import Atlas
from ..analysis.atlas.rows import row
from ..analysis.atlas.sentences import sentences
from ..errors import UsageError
from ..launch import launch
from ..settings import ScanSettings
from ..texts import Corpus
from ..track.run import check_inputs, free, read_report, scan_into, single_process, wait_for_all
from ..track.specs import Checkpoint, single

ARCHITECTURE = "architecture.json"  # beside each model's report.json: its row's architecture columns


def read_list(path: Path) -> list[str]:
    """The models a ``--list`` file names, one per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot read the list of models ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: cannot read the list of models (not UTF-8 text)") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def models(given: Sequence[str], listed: Path | None = None) -> list[Checkpoint]:
    """The models of the atlas, in order: those given, then the list file's; each checked before any model loads, each
    once."""
    specs = [*given, *(read_list(listed) if listed is not None else [])]
    if not specs:
        raise UsageError("atlas needs at least one MODEL (or --list FILE)" + (f": {listed} lists none" if listed else ""))
    found = [single(spec) for spec in specs]
    seen: set[str] = set()
    for model in found:
        if model.target in seen:
            raise UsageError(f"{model.spec} is in the atlas twice")
        seen.add(model.target)
    return found


def folders(models: Sequence[Checkpoint], out: Path) -> list[Path]:
    """Each model's report folder in ``out``: its name as a folder (massact scan's default), numbered where two would
    share one."""
    from ..report.files import slug

    names = [slug(model.spec) for model in models]
    if len(set(names)) < len(names):
        names = [f"{index:03d}-{name}" for index, name in enumerate(names)]
    return [out / name for name in names]


@dataclass(frozen=True)
class Job:
    """One model's part of the atlas: what ``survey`` needs, as a process of its own receives it."""

    model: Checkpoint
    texts: Corpus
    settings: ScanSettings
    folder: Path
    formats: frozenset[str]


def survey(job: Job, progress=None) -> None:
    """Load the model once: keep the report in its folder where it was made from this model with these texts and
    settings (else refuse it), or scan it and write the report; then write its architecture.json."""
    from ..analysis.results import check_report_model
    from ..models.architecture import architecture
    from ..models.loading import load
    from ..report.atomic import write_file
    from ..report.schema import write_architecture

    report = job.folder / "report.json"
    saved = read_report(job.folder) if report.is_file() else None
    if saved is not None:  # before the load: a report of other inputs is refused at once
        check_inputs(saved, job.folder, job.texts, job.settings)
    lm = load(job.model.target, dtype=job.settings.dtype, device=job.settings.device, log=lambda _: None)
    lm.name = job.model.spec
    try:
        if saved is not None:
            check_report_model(saved, lm, str(report))
        else:
            scan_into(lm, job.texts, job.settings, job.folder, progress, set(job.formats) | {"json"})
        write_file(job.folder / ARCHITECTURE, write_architecture(architecture(lm.adapter, lm.model)) + "\n")
    finally:  # one model in memory at a time
        del lm
        free()


def isolated(job: Job) -> None:
    """``survey`` in a fresh interpreter (spawned, so no CUDA state or thread is inherited), waited for; what it raised
    is raised here. A process that dies without a word (killed: out of memory) is one UsageError line, its report not
    written: the next run of the atlas tries it again."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, job), name=f"massact atlas: {job.model.spec}")
    try:
        process.start()
        send.close()
        try:
            raised = receive.recv()
        except EOFError:
            process.join()
            raise UsageError(f"{job.model.spec}: its process ended with exit code {process.exitcode} before its report was "
                             "written (killed, out of memory?); run the atlas again to try it again, or leave it out") from None
        process.join()
    finally:
        if process.is_alive():  # the atlas was stopped: its model's process goes with it
            process.terminate()
            process.join()
        receive.close()
    if raised is not None:
        raise raised


def _child(send, job: Job) -> None:
    """A model's own process: ``survey``, then None, or what it raised, sent back to the atlas."""
    _quiet()
    try:
        survey(job)
        send.send(None)
    except BaseException as error:  # everything goes back to the atlas, which raises it
        try:
            send.send(error)
        except Exception:  # an exception that does not pickle: its words
            send.send(RuntimeError(f"{job.model.spec}: {type(error).__name__}: {error}"))
    finally:
        send.close()


def _quiet() -> None:
    """A model's process prints what the atlas prints: transformers' and torchao's notes at a model load are not ours."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(models: Sequence[Checkpoint], texts: Corpus, settings: ScanSettings, out: Path, log: Callable[[str], None],
        progress=None, formats: set[str] | None = None, isolate: bool = True) -> Atlas | None:
    """Survey the models not done yet (this process's share of them) on the same ``texts`` with the same ``settings``,
    each in a process of its own (``isolate``; else one after another in this one), then read every folder back into
    the atlas. Returns None in every process but the first of a multi-process launch."""
    from ..report.files import FORMATS

    rank, world = launch()
    places = folders(models, out)
    for index, (model, folder) in enumerate(zip(models, places)):
        if index % world != rank:
            continue
        where = f"model {index + 1}/{len(models)} ({model.spec})"
        log(f"{where}: already done, in {folder}" if (folder / "report.json").is_file() else f"{where}: scanning")
        job = Job(model=model, texts=texts, settings=settings, folder=folder, formats=frozenset(formats or FORMATS))
        if isolate:
            with single_process():  # the model's process is a scan of its own, whatever the launch
                isolated(job)
        else:
            survey(job, progress)
    if world > 1:
        wait_for_all()
    if rank != 0:
        return None
    return collect(models, places, {"texts": texts.describe(), **asdict(settings)})


def collect(models: Sequence[Checkpoint], places: Sequence[Path], settings: dict) -> Atlas:
    """The atlas from the models' folders: each report and architecture read back through the schema, a row each,
    then the sentences the rows support."""
    from ..report.schema import load_architecture

    rows = []
    for model, folder in zip(models, places):
        report = read_report(folder)
        found = row(model.spec, load_architecture(folder / ARCHITECTURE), report.findings, report.mechanism, report.causal.attention,
                    report.deploy.precision, report.valley, report.qk)
        found.report = folder.name
        rows.append(found)
    return Atlas(rows=rows, sentences=sentences(rows), settings=settings)
