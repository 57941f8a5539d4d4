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


DEFAULT = "default"  # the MODEL that names the embedded default model (what `massact scan` scans without one)


def named(spec: str) -> Checkpoint:
    """One model of the atlas, checked before any model loads: ``default`` (where no such file or folder is here) is
    the embedded default model, named as its report names it; else a model directory, a .gguf file or a hub id."""
    if spec == DEFAULT and not Path(spec).exists():
        from ..models.loading import DEFAULT_NAME, default_gguf

        return Checkpoint(spec=DEFAULT_NAME, target=str(default_gguf()))
    return single(spec)


def models(given: Sequence[str], listed: Path | None = None) -> list[Checkpoint]:
    """The models of the atlas, in order: those given, then the list file's; each checked before any model loads, each
    once."""
    specs = [*given, *(read_list(listed) if listed is not None else [])]
    if not specs:
        raise UsageError("atlas needs at least one MODEL (or --list FILE)" + (f": {listed} lists none" if listed else ""))
    found = [named(spec) for spec in specs]
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
    """One model's part of the atlas: what ``survey`` needs, as a process of its own receives it. ``stream`` and
    ``memory``: ``massact scan``'s --stream and --memory (the model read block by block when asked, or when its
    weights exceed ``memory``; None: the memory available)."""

    model: Checkpoint
    texts: Corpus
    settings: ScanSettings
    folder: Path
    formats: frozenset[str]
    stream: bool = False
    memory: int | None = None


def files(model: Checkpoint) -> Path | None:
    """The model's files on disk, as the streaming decision reads them: its directory, a hub id's snapshot (downloaded
    where it is not in the cache), None for a .gguf file."""
    from ..models.loading import _hub_source, split_revision

    if model.local is not None:
        return model.local
    if Path(model.target).is_file():
        return None
    return Path(_hub_source(*split_revision(model.target)))


def survey(job: Job, progress=None, log: Callable[[str], None] = lambda _: None) -> None:
    """Load the model once, in memory or, where its weights exceed the memory limit, block by block (said in one line
    to ``log``): keep the report in its folder where it was made from this model with these texts and settings (else
    refuse it), or scan it and write the report; then write its architecture.json. A streamed model's settings are
    the atlas's with ``quant`` off, which a streamed scan does not measure yet."""
    from ..models.checkpoint import streams

    report = job.folder / "report.json"
    saved = read_report(job.folder) if report.is_file() else None
    directory = files(job.model)
    streamed, reason = streams(directory, job.settings.dtype, job.stream, job.memory, job.model.spec)
    if reason:
        log(f"{job.model.spec}: {reason}")
    if saved is not None:  # before the load: a report of other inputs is refused at once
        check_inputs(saved, job.folder, job.texts, streamed_settings(job.settings) if saved.model.streamed else job.settings)
        streamed = streamed or saved.model.streamed
    if streamed:
        _survey_streamed(job, directory, saved, progress)
    else:
        _survey_in_memory(job, saved, progress)


def streamed_settings(settings: ScanSettings) -> ScanSettings:
    """The settings a streamed scan records (``massact.scan_streamed``): quantization, which it does not measure, off."""
    return settings.replace(quant=False)


def _survey_in_memory(job: Job, saved, progress) -> None:
    from ..analysis.results import check_report_model
    from ..models.loading import load

    lm = load(job.model.target, dtype=job.settings.dtype, device=job.settings.device, log=lambda _: None)
    lm.name = job.model.spec
    try:
        if saved is not None:
            check_report_model(saved, lm, str(job.folder / "report.json"))
        else:
            scan_into(lm, job.texts, job.settings, job.folder, progress, set(job.formats) | {"json"})
        _write_architecture(job.folder, lm)
    finally:  # one model in memory at a time
        del lm
        free()


def _survey_streamed(job: Job, directory: Path, saved, progress) -> None:
    """``survey`` of a model read block by block (``massact.scan_streamed``), its hidden states beyond the memory
    limit in its folder; a saved report's model checked in one pass over the blocks."""
    from ..analysis.detect.stream import stream_place
    from ..analysis.results import check_streamed_report_model
    from ..models.checkpoint import load_streamed
    from ..models.loading import DTYPES, resolve_device
    from ..pipeline import scan_streamed
    from ..report.files import write_report

    settings = streamed_settings(job.settings)
    streamed = load_streamed(str(directory), DTYPES[settings.dtype], resolve_device(settings.device), name=job.model.spec)
    if job.model.local is None:  # a hub id: what `massact verify` loads again
        streamed.lm.source = job.model.target
    try:
        if saved is not None:
            check_streamed_report_model(saved, streamed, str(job.folder / "report.json"))
        else:
            place = stream_place(streamed, settings, job.folder, job.memory)
            with single_process():
                report = scan_streamed(streamed, job.texts, settings, place=place, progress=progress)
            write_report(report, job.folder, set(job.formats) | {"json"})
        _write_architecture(job.folder, streamed.lm)
    finally:
        del streamed
        free()


def _write_architecture(folder: Path, lm) -> None:
    from ..models.architecture import architecture
    from ..report.atomic import write_file
    from ..report.schema import write_architecture

    write_file(folder / ARCHITECTURE, write_architecture(architecture(lm.adapter, lm.model)) + "\n")


def isolated(job: Job, log: Callable[[str], None] = lambda _: None) -> None:
    """``survey`` in a fresh interpreter (spawned, so no CUDA state or thread is inherited), waited for; the lines it
    says go to ``log``, and what it raised is raised here. A process that dies without a word (killed: out of memory)
    is one UsageError line, its report not written: the next run of the atlas tries it again."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, job), name=f"massact atlas: {job.model.spec}")
    try:
        process.start()
        send.close()
        try:
            while (message := receive.recv())[0] == "log":
                log(message[1])
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
    if message[1] is not None:
        raise message[1]


def _child(send, job: Job) -> None:
    """A model's own process: ``survey``, its lines sent back as ("log", line), then ("done", None), or ("done", what
    it raised), to the atlas, which raises it."""
    _quiet()
    try:
        survey(job, log=lambda line: send.send(("log", line)))
        send.send(("done", None))
    except BaseException as error:  # everything goes back to the atlas, which raises it
        try:
            send.send(("done", error))
        except Exception:  # an exception that does not pickle: its words
            send.send(("done", RuntimeError(f"{job.model.spec}: {type(error).__name__}: {error}")))
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
        progress=None, formats: set[str] | None = None, isolate: bool = True, stream: bool = False,
        memory: int | None = None) -> Atlas | None:
    """Survey the models not done yet (this process's share of them) on the same ``texts`` with the same ``settings``,
    each in a process of its own (``isolate``; else one after another in this one), each read block by block with
    ``stream`` or where its weights exceed ``memory`` (see ``Job``), then read every folder back into the atlas.
    Returns None in every process but the first of a multi-process launch."""
    from ..report.files import FORMATS

    if stream:  # before any model loads: a .gguf file has no blocks to read apart
        for model in models:
            if model.local is None and Path(model.target).is_file():
                raise UsageError(f"--stream reads a model directory of safetensors files; {model.spec} is not one")
    rank, world = launch()
    places = folders(models, out)
    for index, (model, folder) in enumerate(zip(models, places)):
        if index % world != rank:
            continue
        where = f"model {index + 1}/{len(models)} ({model.spec})"
        log(f"{where}: already done, in {folder}" if (folder / "report.json").is_file() else f"{where}: scanning")
        job = Job(model=model, texts=texts, settings=settings, folder=folder, formats=frozenset(formats or FORMATS),
                  stream=stream, memory=memory)
        if isolate:
            with single_process():  # the model's process is a scan of its own, whatever the launch
                isolated(job, log)
        else:
            survey(job, progress, log)
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
                    report.deploy.precision, report.valley, report.qk, report.model.streamed)
        found.report = folder.name
        rows.append(found)
    return Atlas(rows=rows, sentences=sentences(rows), settings=settings)
