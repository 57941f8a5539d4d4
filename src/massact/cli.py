"""massact's command line: a thin layer over ``massact.scan``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .report.sections import names, section
from .settings import DTYPES, ENGINES, QUANT_DEFAULTS, QUANT_GRIDS, ScanSettings, whole
from .texts import read_eval_file

if TYPE_CHECKING:  # the analysis packages load only when a command needs them
    from .analysis.results import Report

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


_DEFAULTS = ScanSettings()  # every option's default is the settings' own


def _default(name: str) -> str:
    return f"default {getattr(_DEFAULTS, name)}"


def _options(title: str, *arguments: tuple[tuple[str, ...], dict]) -> argparse.ArgumentParser:
    """A parent parser holding one titled argument group (``massact CMD --help`` lists options by group). Options
    default to None, so that a command takes ScanSettings's default, or a saved report's, where one is not given."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group(title)
    for flags, keywords in arguments:
        group.add_argument(*flags, **keywords)
    return parent


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """The options several commands take, declared once each, in groups (argparse parent parsers)."""
    count = dict(type=int)
    return dict(
        model=_options("model", (("--dtype",), dict(choices=DTYPES, help="number format of the weights (default float32; verify "
                                                                        "and quant: the report's; quant on a report: for its "
                                                                        "sweep only, the report keeps its own)")),
                       (("--device",), dict(help="auto, cpu, cuda or cuda:N (default auto; verify and quant: the report's; "
                                                 "quant on a report: for its sweep only)"))),
        load=_options("loading", (("--device-map",), dict(help="spread a large model over the devices (accelerate): auto, "
                                                               "balanced, sequential")),
                      (("--trust-remote-code",), dict(action="store_true", help="let the model directory's own Python code "
                                                                                "define its classes (runs that code)"))),
        corpus=_options("corpus", (("--text",), dict(action="append", help="a text to scan (repeatable; default: built-in sentences)")),
                        (("--file",), dict(help="UTF-8 file of texts: one per line, or paragraphs separated by blank lines")),
                        (("--dataset",), dict(help="Hugging Face dataset NAME[:CONFIG[:SPLIT]]: a save_to_disk directory, a "
                                                   "local folder of data files, or a hub name")),
                        (("--max-texts",), dict(**count, help="scan at most this many texts")),
                        (("--max-length",), dict(**count, help="split texts longer than this many tokens into windows "
                                                                "(default: refuse texts longer than the context)"))),
        criterion=_options("criterion", (("--min-abs",), dict(type=float, help=f"massive: |a| at least this ({_default('min_abs')})")),
                           (("--min-ratio",), dict(type=float, help="massive: |a| at least this times the median |a| "
                                                                    f"({_default('min_ratio')})")),
                           (("--top-k",), dict(**count, help=f"largest activations listed per block ({_default('top_k')})"))),
        analysis=_options("analysis", (("--top-neurons",), dict(**count, help="neurons listed in the attribution "
                                                                               f"({_default('top_neurons')})")),
                          (("--chain-depth",), dict(**count, help="links followed back from the writing neuron toward the token "
                                                                   f"in the trigger chain ({_default('chain_depth')})")),
                          (("--super-expert-quantile",), dict(type=float, help="a mixture of experts' super expert: max |output| "
                                                                               "above this quantile of all experts' "
                                                                               f"({_default('super_expert_quantile')})")),
                          (("--super-expert-fraction",), dict(type=float, help="... and above this fraction of the largest "
                                                                               f"({_default('super_expert_fraction')})")),
                          (("--super-expert-depth",), dict(type=float, help="... in the first this-share of the blocks "
                                                                            f"({_default('super_expert_depth')})"))),
        verification=_options("verification", (("--sink-epsilon",), dict(type=float, help="a head is a sink head when its average "
                                                                                         "attention on a sink token exceeds this "
                                                                                         f"(Gu et al. 2024; {_default('sink_epsilon')})"))),
        evaluation=_options("evaluation", (("--eval-file",), dict(help="UTF-8 text for perplexity (default: the shipped "
                                                                        "public-domain sample)"))),
        deployment=_options("deployment", (("--quant-grid",), dict(choices=QUANT_GRIDS, help="quantization settings: default (a few "
                                                                                           "minutes on a small CPU), full, or none "
                                                                                           "(the engines only)")),
                            (("--clip-z",), dict(type=float, help="z-score at which the held-out variant clips the remaining "
                                                                  f"weights (default {QUANT_DEFAULTS['clip_z']})")),
                            (("--block-size",), dict(**count, help="entries per flat block of the block-wise RTN settings "
                                                                   f"(default {QUANT_DEFAULTS['block_size']})")),
                            (("--engine",), dict(type=_engines, dest="engines",
                                                 help="also quantize with real libraries, comma-separated: quanto, hqq, torchao, "
                                                      "bnb (pip install 'massact[engines]'): everything, the protect list in "
                                                      "float, a random control, the super weights restored"))),
        output=_options("output", (("--format",), dict(default="txt,json,html,png", help="outputs to write, comma-separated: "
                                                                                        "txt,json,html,png")),
                        (("--quiet",), dict(action="store_true", help="no report on the terminal, no progress bars: only the "
                                                                      "paths written"))),
        scale=_options("scale", (("--batch-size",), dict(**count, help=f"texts per forward pass (padding is never counted; "
                                                                       f"{_default('batch_size')})"))),
    )


def _group(parser: argparse.ArgumentParser, title: str):
    """The parser's argument group ``title`` (copied from a parent): a command's own options join the shared ones."""
    return next(group for group in parser._action_groups if group.title == title)


def _full(parser: argparse.ArgumentParser) -> None:
    _group(parser, "output").add_argument("--full", action="store_true", help="print the whole report (as report.txt), not the "
                                                                              "one-screen summary")


def _engines(text: str) -> tuple[str, ...]:
    """--engine's comma-separated names, each once in the order given; an empty list or an unknown name is refused
    here, while the options are read (before a model loads or an engine's library is imported)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:  # "" would save no engines and drop a report's engine rows
        raise argparse.ArgumentTypeError(f"give at least one engine: {', '.join(ENGINES)} (comma-separated), not {text!r}")
    unknown = [name for name in names if name not in ENGINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ENGINES)}, not {unknown[0]!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="massact", description="Find a transformer's massive activations and what writes them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    o = _shared_options()
    scan = commands.add_parser("scan", parents=[o["model"], o["load"], o["corpus"], o["criterion"], o["analysis"], o["verification"],
                                                o["evaluation"], o["deployment"], o["output"], o["scale"]],
                               help="scan a model, trace its massive activations, write the report")
    scan.add_argument("model", nargs="?", help="hub id, model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    checks = _group(scan, "verification")
    checks.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="confirm by intervention and measure attention sinks (default: on where their time, estimated from the "
                             "corpus pass, is at most that pass's own or 10 minutes)")
    checks.add_argument("--super-weight-steps", type=int, help="super weights zeroed one after another per dim, at most "
                                                                f"({_default('super_weight_steps')})")
    _group(scan, "deployment").add_argument("--quant", action="store_true",
                                            help="also measure what weight and activation quantization do "
                                                 f"(section {section('quantization').number})")
    _group(scan, "output").add_argument("--out", type=Path, help="output directory (default: ./massact-report/<model>/)")
    _full(scan)
    scale = _group(scan, "scale")
    scale.add_argument("--checkpoint-every", type=int, help="write the scan's merged state to OUT/scan-state.pt every N batches "
                                                            f"(removed when the scan ends; {_default('checkpoint_every')})")
    scale.add_argument("--resume", action="store_true", help="continue an interrupted scan from OUT/scan-state.pt (a streamed "
                                                             "one from OUT/stream-state.pt, at the next block)")
    scale.add_argument("--stream", action="store_true", help="read the model directory's safetensors block by block: each "
                                                             "block's weights once per pass, memory flat in depth (default: "
                                                             "when its weights exceed the memory limit)")
    scale.add_argument("--memory", help="host memory the scan may use, e.g. 1.5GB (default: the memory available): a model "
                                        "whose weights exceed it is streamed, and the corpus's hidden states beyond it go "
                                        "to a file in OUT")
    quant = commands.add_parser("quant", parents=[o["model"], o["evaluation"], o["deployment"], o["output"]],
                                help="quantization sweep and precision headroom, on a model or a saved report")
    quant.add_argument("target", nargs="?", help="a report directory (report.json), or a model as for scan "
                                                 "(default: embedded SmolLM2-135M-Instruct)")
    _group(quant, "deployment").add_argument("--protect", type=Path,
                                             help="a protect.json to use instead of scanning the model (with a MODEL)")
    _group(quant, "output").add_argument("--out", type=Path, help="output directory for a MODEL (default: ./massact-report/<model>/); "
                                                                  "a report directory is updated in place")
    quant.add_argument("--memory", help="host memory the sweep may use, e.g. 1.5GB (default: the memory available): a model "
                                        "directory whose weights exceed it is read block by block")
    verify = commands.add_parser("verify", parents=[o["model"], o["verification"], o["evaluation"], o["output"]],
                                 help="re-run a saved report with verification and its saved settings, writing it back in place")
    verify.add_argument("report_dir", type=Path, help="a directory holding report.json from massact scan")
    _full(verify)
    show = commands.add_parser("show", help="print a saved report, its one-screen summary, or one section")
    show.add_argument("report_dir", type=Path, help="a directory holding report.json")
    show.add_argument("--section", help=f"one section by name or number: {names()}")
    show.add_argument("--summary", action="store_true", help="the one-screen summary that massact scan prints")
    track = commands.add_parser("track", parents=[o["model"], o["corpus"], o["criterion"], o["analysis"], o["verification"],
                                                  o["evaluation"], o["output"], o["scale"]],
                                help="scan checkpoints of one model (a training history, base and fine-tune) and align them")
    track.add_argument("specs", nargs="+", metavar="SPEC",
                       help="a model directory, a .gguf file, a hub ID@REVISION, a directory of Trainer checkpoint-<step>/ "
                            "folders, or a training monitor's .jsonl file (then only .jsonl files)")
    _group(track, "output").add_argument("--out", type=Path, default=Path("massact-report") / "track",
                                         help="output directory: track.json/.txt/.html and the figures, one report folder per checkpoint")
    _group(track, "verification").add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                                               help="verify each checkpoint by intervention and measure its attention sink (default: off)")
    atlas = commands.add_parser("atlas", parents=[o["model"], o["corpus"], o["criterion"], o["analysis"], o["verification"],
                                                  o["evaluation"], o["output"], o["scale"]],
                                help="scan several models with the same texts and settings: a row each, the architecture beside "
                                     "what is measured, the curves, the sentences the rows support")
    atlas.add_argument("models", nargs="*", metavar="MODEL", help="a model directory, a .gguf file or a hub ID[@REVISION]")
    atlas.add_argument("--list", type=Path, dest="model_list", help="a file of models, one per line (# comments and blank lines skipped)")
    _group(atlas, "output").add_argument("--out", type=Path, default=Path("massact-report") / "atlas",
                                         help="output directory: atlas.json/.csv/.html and the curves, one report folder per model")
    _group(atlas, "verification").add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                                               help="verify each model by intervention and measure its attention sink (default: off)")
    atlas_scale = _group(atlas, "scale")
    atlas_scale.add_argument("--in-process", action="store_true",
                             help="scan the models one after another in this process, not each in a process of its own "
                                  "(quicker to start for small models)")
    atlas_scale.add_argument("--stream", action="store_true", help="read every model's safetensors block by block, as scan "
                                                                   "--stream does (default: each model whose weights exceed "
                                                                   "the memory limit; a streamed model is not verified)")
    atlas_scale.add_argument("--memory", help="host memory each model's scan may use, e.g. 1.5GB (default: the memory "
                                              "available): a model whose weights exceed it is streamed")
    profile = commands.add_parser("profile", parents=[o["model"], o["corpus"], o["criterion"], o["scale"]],
                                  help="profile.json: per block the massive dims, the rules that predict their carriers, "
                                       "the outlier severity")
    profile.add_argument("target", nargs="?", help="a report directory (report.json: its model and texts), or a model as for scan "
                                                   "(default: embedded SmolLM2-135M-Instruct)")
    output = profile.add_argument_group("output")
    output.add_argument("--out", type=Path, help="output directory for a MODEL (default: ./massact-report/<model>/); a report "
                                                 "directory gets profile.json beside report.json")
    output.add_argument("--quiet", action="store_true", help="only the path written")
    protect = commands.add_parser("protect", help="a protect.json in the configuration a quantization engine takes")
    protect_commands = protect.add_subparsers(dest="action", required=True, parser_class=_Parser)
    export = protect_commands.add_parser("export", help="write the engine's configuration that keeps the protect list's "
                                                        "modules out of quantization (JSON)")
    export.add_argument("protect", type=Path, help="a protect.json (written by massact scan)")
    export.add_argument("--engine", required=True, help="quanto, hqq, torchao, bnb, llm-compressor or llama.cpp")
    export.add_argument("--out", type=Path, help="file to write (default: the terminal)")
    export.add_argument("--gguf-arch", default="llama", help="llama.cpp: the GGUF architecture whose tensor names to use (default llama)")
    compare = commands.add_parser("compare", help="put saved reports side by side in one page")
    compare.add_argument("report_dirs", type=Path, nargs="+", help="directories holding report.json")
    compare.add_argument("--out", type=Path, default=Path("massact-report") / "compare", help="output directory")
    return parser


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """Run one command; returns the exit code. ``process``: this interpreter is massact's own (``run``), so an
    interrupt that lands inside an import may end it at once (see ``_on_interrupt``)."""
    interrupted, previous = _on_interrupt(process)
    try:
        args = build_parser().parse_args(argv)
        code = {"scan": _scan, "verify": _verify, "compare": _compare, "quant": _quant, "show": _show,
                "track": _track, "atlas": _atlas, "protect": _protect,
                "profile": _profile}[args.command](args)
    except UsageError as error:
        print(f"massact: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as error:
        # Ctrl-C can land inside a library's lazy import, which then raises its own error (ModuleNotFoundError)
        # instead of KeyboardInterrupt: whatever it became, an interrupt is one line and exit 128 + the signal.
        if interrupted or isinstance(error, KeyboardInterrupt):
            return _stopped(interrupted[0] if interrupted else signal.SIGINT)
        failure = _model_failure(error)
        if failure is None:
            raise
        print(f"massact: error: {failure}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for signum, handler in previous.items():  # called from Python (a test, a notebook): the caller's handlers back
            # massact's own process: a signal from here on, while the interpreter tears torch down (up to a second),
            # finds the work done; it is one line and exit 128 + the signal, not Python's silent death by SIGINT.
            signal.signal(signum, _late_stop if process else handler)
    # A signal whose KeyboardInterrupt Python swallowed (raised inside a garbage-collection or weakref callback,
    # which Python reports and ignores) still ends the run as a stop: its files are whole, its exit code says so.
    return _stopped(interrupted[0]) if interrupted else code


def run() -> None:
    """The ``massact`` program (console script and ``python -m massact``)."""
    raise SystemExit(main(process=True))


def _late_stop(signum, frame) -> None:
    """A stop after the command's work: what it printed is flushed, then one line and exit 128 + the signal."""
    try:
        sys.stdout.flush()
    except (OSError, RuntimeError):  # a closed pipe, or the signal landed inside a write to stdout
        pass
    os.write(2, (_STOPPED[signum] + "\n").encode())
    os._exit(128 + signum)


def _stopped(signum: int) -> int:
    print(_STOPPED[signum], file=sys.stderr)
    return 128 + signum


def _model_failure(error: BaseException) -> str | None:
    """One line where the model's own code raised (see models/failures.py); None for any other error. Only where
    torch is loaded: without it no model ran."""
    if "torch" not in sys.modules:
        return None
    from .models.failures import describe

    return describe(error)


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# What a stop says: Ctrl-C, or SIGTERM (what a batch scheduler sends before it kills a job). A scan run with
# --checkpoint-every keeps its last saved state, so a preempted job resumes with --resume.
_STOPPED = {signal.SIGINT: "massact: interrupted", signal.SIGTERM: "massact: terminated (SIGTERM)"}


def _on_interrupt(process: bool) -> tuple[list[int], dict[int, object]]:
    """Note every SIGINT and SIGTERM (in the returned list) and raise KeyboardInterrupt, as Python's own handler does
    for SIGINT; also the handlers it replaced (none off the main thread, where none is set).

    In massact's own process a stop inside an import ends it at once instead: the import may be running under a
    compiled extension's initialisation (torch's), where a Python exception aborts the interpreter with a C++
    traceback. An import writes none of our files, so nothing is lost."""
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        if process and _importing(frame):
            print(_STOPPED[signum], file=sys.stderr, flush=True)
            os._exit(128 + signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return seen, {}
    return seen, {signum: signal.signal(signum, handler) for signum in _STOPPED}


def _scan(args) -> int:
    from .models.loading import DEFAULT_NAME
    from .report.atomic import check_writable
    from .report.files import parse_formats, slug

    settings = ScanSettings(verify=bool(args.verify), eval_file=_eval_file(args.eval_file),
                            **_given(args, *_SCAN_OPTIONS, "quant", "quant_grid", "clip_z", "block_size", "engines", "super_weight_steps",
                                     "chain_depth", "checkpoint_every", "super_expert_quantile", "super_expert_fraction",
                                     "super_expert_depth")).check()
    formats = parse_formats(args.format)
    texts = _corpus(args)
    texts.check()  # read input before the slow model load, so bad input fails fast
    out = args.out or Path("massact-report") / slug(args.model or DEFAULT_NAME)
    check_writable(out)  # before the slow model load and scan
    from .models.checkpoint import parse_size

    memory = parse_size(args.memory) if args.memory is not None else None
    if _streams(args.model, settings.dtype, args.stream, memory, _log(args.quiet)):
        if args.device_map:
            raise UsageError("--device-map places a model in memory, and this one is streamed: drop one of them")
        return _run_streamed(args.model, texts, settings, out, formats, args.quiet, memory, resume=args.resume, full=args.full,
                             verify=args.verify)
    return _run(args.model, texts, settings, out, formats, args.quiet, verify=args.verify, resume=args.resume, full=args.full,
                device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def _streams(model: str | None, dtype: str, stream: bool, memory: int | None, log) -> bool:
    """Whether the scan streams the model (``models.checkpoint.streams``), the reason said in one line where it was
    not asked for."""
    from .models.checkpoint import streams

    streamed, reason = streams(Path(model).expanduser() if model is not None else None, dtype, stream, memory,
                               model or "the default model")
    if reason:
        log(reason)
    return streamed


def _run_streamed(model: str, texts, settings: ScanSettings, out: Path, formats: set[str], quiet: bool, memory: int | None,
                  *, resume: bool = False, full: bool = False, verify: bool | None = None, saved: Report | None = None) -> int:
    """Scan the model directory ``model`` block by block and write the report (see ``massact.scan_streamed``): the
    corpus's hidden states kept on the device and in host memory within ``memory`` (None: the memory available),
    beyond it in a file in ``out``. ``verify`` None: verify where the estimate fits (``analysis.causal.budget``).
    ``saved``: the report this scan re-runs (``massact verify``), whose model's weights the streamed ones must be
    (checked from the samples the passes take, before anything is written)."""
    from .analysis.detect.stream import stream_place
    from .models.checkpoint import load_streamed
    from .models.loading import DTYPES, resolve_device
    from .pipeline import scan_streamed

    streamed = load_streamed(str(Path(model).expanduser()), DTYPES[settings.dtype], resolve_device(settings.device))
    place = stream_place(streamed, settings, out, memory, resume)
    with _progress(_bars(quiet)) as progress:
        report = scan_streamed(streamed, texts, settings.replace(verify=bool(verify)), place=place, progress=progress,
                               auto_verify=verify is None, quantization=saved.deploy.quantization if saved else None)
    if saved is not None:
        from .models.identity import check_same_weights

        check_same_weights(saved.model.weights_sha256, saved.model.dtype, streamed.lm.model, str(out / "report.json"),
                           streamed.samples)
        if saved.deploy.quantization is not None and report.deploy.quantization is saved.deploy.quantization:
            _log(quiet)("kept the saved quantization sweep: the same protect list, evaluation text, dtype, device and grid")
    return _write(report, out, formats, quiet, full)


def _track(args) -> int:
    """massact track: every checkpoint scanned with the same texts and settings, its report in its own folder (done
    ones kept), then aligned; or a training monitor's JSONL records drawn as the same timeline."""
    from rich.console import Group

    from .report.atomic import check_writable
    from .report.files import parse_formats
    from .report.text import terminal
    from .report.track import renderables, write_track
    from .track import monitor, specs
    from .track.run import run

    settings = ScanSettings(verify=args.verify, eval_file=_eval_file(args.eval_file),
                            **_given(args, *_SCAN_OPTIONS, "chain_depth", "super_expert_quantile", "super_expert_fraction",
                                     "super_expert_depth", "sink_epsilon")).check()
    formats = parse_formats(args.format)
    journals = [spec for spec in args.specs if spec.endswith(".jsonl")]
    check_writable(args.out)
    log = _log(args.quiet)  # before any SPEC is read: it also quiets transformers, whose config warnings come first
    if journals:
        if len(journals) < len(args.specs):
            raise UsageError("a track is either monitor .jsonl files or checkpoints, not both")
        track = monitor.timeline(monitor.read_journals([Path(path) for path in journals]), ", ".join(journals))
    else:
        checkpoints = specs.expand(args.specs)  # every SPEC checked before any model loads
        texts = _corpus(args)
        texts.check()
        with _progress(_bars(args.quiet)) as progress:
            track = run(checkpoints, texts, settings, args.out, log, progress, formats)
        if track is None:  # another process of a multi-process launch writes the track
            return 0
    written = write_track(track, args.out, formats)
    if not args.quiet:
        terminal().print(Group(*renderables(track, plain=False)))
    for path in written:
        print(f"wrote {path}")
    return 0


def _atlas(args) -> int:
    """massact atlas: every model scanned with the same texts and settings (``massact.atlas.run``), then a row each."""
    from .atlas.run import models, run
    from .report.atlas import write_atlas
    from .report.atomic import check_writable
    from .report.files import parse_formats

    settings = ScanSettings(verify=args.verify, eval_file=_eval_file(args.eval_file),
                            **_given(args, *_SCAN_OPTIONS, "chain_depth", "super_expert_quantile", "super_expert_fraction",
                                     "super_expert_depth", "sink_epsilon")).check()
    from .models.checkpoint import parse_size

    formats = parse_formats(args.format)
    memory = parse_size(args.memory) if args.memory is not None else None
    check_writable(args.out)
    log = _log(args.quiet)  # before any MODEL is read: it also quiets transformers
    listed = models(args.models, args.model_list)  # every MODEL checked before any loads
    texts = _corpus(args)
    texts.check()
    with _progress(_bars(args.quiet) and args.in_process) as progress:
        atlas = run(listed, texts, settings, args.out, log, progress, formats, isolate=not args.in_process, stream=args.stream,
                    memory=memory)
    if atlas is None:  # another process of a multi-process launch writes the atlas
        return 0
    written = write_atlas(atlas, args.out, formats)
    if not args.quiet:
        print("\n".join(sentence.text for sentence in atlas.sentences) or "The rows support no sentence across models.")
    for path in written:
        print(f"wrote {path}")
    return 0


def _profile(args) -> int:
    """massact profile: a model's profile.json, from a saved report (its model, texts and criterion) or a scan."""
    from .models.loading import DEFAULT_NAME, load
    from .pipeline import profile
    from .report.atomic import check_writable, write_set
    from .report.files import slug
    from .report.schema import load_report, write_profile

    report = None
    if args.target and (Path(args.target) / "report.json").is_file():
        report = load_report(Path(args.target))
        if args.min_abs is not None or args.min_ratio is not None or args.max_length is not None:
            raise UsageError("a report's profile uses the report's criterion and windows: --min-abs, --min-ratio and "
                             "--max-length go with a MODEL")
        if args.out is not None:
            raise UsageError("a report directory gets its profile.json beside report.json: --out goes with a MODEL")
        out, spec = Path(args.target), report.model.source
        settings = ScanSettings(dtype=args.dtype or report.model.dtype, device=args.device or "auto",
                                **_given(args, "batch_size")).check()
    else:
        out, spec = args.out or Path("massact-report") / slug(args.target or DEFAULT_NAME), args.target
        settings = ScanSettings(**_given(args, "dtype", "device", "batch_size", "min_abs", "min_ratio", "max_length")).check()
    texts = _corpus(args) if (args.text or args.file or args.dataset) or report is None else None
    if texts is not None:
        texts.check()
    check_writable(out)
    log = _log(args.quiet)
    lm = load(spec, dtype=settings.dtype, device=settings.device, log=log)
    with _progress(_bars(args.quiet)) as progress:
        found = profile(lm, texts, settings, report=report, progress=progress)
    write_set(out, {"profile.json": write_profile(found) + "\n"}, keep=True)  # a new folder appears only whole
    if not args.quiet:
        print(repr(found))
    print(f"wrote {out / 'profile.json'}")
    return 0


def _protect(args) -> int:
    """massact protect export: the protect list as one engine's configuration, written as JSON."""
    from .analysis.deploy.exports import export
    from .report.atomic import write_file
    from .report.schema import load_protect, write_export

    config = export(load_protect(args.protect), args.engine, args.gguf_arch)
    text = write_export(config) + "\n"
    for note in config.get("notes", ()):  # what the list could not name as a module (fused experts): said, not hidden
        print(f"massact: note: {args.engine}: {note}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    write_file(args.out, text)
    print(f"wrote {args.out}")
    return 0


# The options scan, track and profile share, as ScanSettings fields.
_SCAN_OPTIONS = ("top_k", "min_abs", "min_ratio", "top_neurons", "batch_size", "max_length", "sink_epsilon", "dtype", "device")


def _corpus(args):
    """The texts the corpus options name. A file's path is made absolute, so that `massact verify` reads it again
    from anywhere."""
    from .texts import Corpus

    if args.max_texts is not None:
        whole("max_texts", args.max_texts, 1)
    file = str(Path(args.file).resolve()) if args.file and Path(args.file).is_file() else args.file
    return Corpus(texts=tuple(args.text or ()), file=file, dataset=args.dataset, max_texts=args.max_texts)


def _given(args, *names: str) -> dict:
    """The options among ``names`` given on the command line (not None), as ScanSettings fields: the rest keep the
    settings' defaults, or a saved report's."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _quant(args) -> int:
    """massact quant: on a saved report (updated in place), on a model with a protect.json (no scan), or on a model
    (scan without verification, then the sweep)."""
    from .models.loading import DEFAULT_NAME
    from .report.atomic import check_writable
    from .report.files import parse_formats, slug
    from .texts import Corpus

    asked = ScanSettings(quant=True, eval_file=_eval_file(args.eval_file),
                         **_given(args, "quant_grid", "clip_z", "block_size", "engines", "dtype", "device")).check()
    formats = parse_formats(args.format)
    target = Path(args.target) if args.target else None
    if target is not None and target.is_dir() and not (target / "config.json").is_file():
        if not (target / "report.json").is_file():
            raise UsageError(f"{target}: no report.json (not a massact report directory, nor a model directory)")
        return _quant_report(target, args, formats)
    out = args.out or Path("massact-report") / slug(args.target or DEFAULT_NAME)
    check_writable(out)  # before the slow model load and sweep
    if args.protect is not None:
        return _quant_protect(args, asked, out, formats)
    memory = _memory(args)
    if _streams(args.target, asked.dtype, False, memory, _log(args.quiet)):  # the scan and the sweep, streamed
        return _run_streamed(args.target, Corpus(), asked, out, formats, args.quiet, memory, verify=False)
    return _run(args.target, Corpus(), asked, out, formats, args.quiet, verify=False)


def _quant_report(directory: Path, args, formats: set[str]) -> int:
    """The sweep on a saved report's model with the report's settings (the quantization options given here override
    them, and are saved for a later verify). --dtype and --device apply to this sweep only: the report's scan was made
    in its saved dtype and device, which its settings keep (a note in the sweep says where its dtype differs)."""
    from .analysis.deploy.protect import check_model
    from .analysis.results import build_protect, check_report_model
    from .models.loading import load
    from .pipeline import quantize
    from .report.files import write_report
    from .report.schema import load_protect, load_report
    from .report.text import quantization_text

    report = load_report(directory)  # every field checked while it is built
    settings = report.settings.replace(
        quant=True, **_given(args, "quant_grid", "clip_z", "block_size", "engines"),
        **({"eval_file": _eval_file(args.eval_file)} if args.eval_file else {})).check()
    run = settings.replace(**_given(args, "dtype", "device")).check()
    protect = load_protect(args.protect) if args.protect else build_protect(report)
    if not protect.massive_dims:  # said now, before the model loads and an engine's library is imported
        raise UsageError("nothing to measure: the model has no massive activations under the criterion")
    eval_text = read_eval_file(settings.eval_file) if settings.eval_file else None
    if _streams(report.model.source, run.dtype, False, _memory(args), _log(args.quiet)):  # block by block, as it was scanned
        report.deploy.quantization = _quant_streamed(report, protect, run, eval_text, directory, args)
    else:
        lm = load(report.model.source, dtype=run.dtype, device=run.device, log=_log(args.quiet))
        # The model at the report's source must still be the one it was made with: its weights and super weights, as saved.
        check_report_model(report, lm, str(directory / "report.json"))
        if args.protect:
            check_model(protect, lm, str(args.protect))
        with _progress(_bars(args.quiet)) as progress:
            report.deploy.quantization = quantize(lm, protect, run, eval_text, progress)
    note = (f"measured with the weights in {run.dtype} (massact quant --dtype); the rest of the report is the scan's, in "
            f"{settings.dtype}, and a later massact verify runs {settings.dtype} again")
    if run.dtype != settings.dtype and report.deploy.quantization is not None and note not in report.deploy.quantization.notes:
        report.deploy.quantization.notes.insert(0, note)
    report.settings = settings  # the scan's dtype and device, as it was made and as verify re-runs it
    written = write_report(report, directory, formats)
    if not args.quiet:
        print(quantization_text(report.deploy.quantization, report.deploy.precision), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _quant_streamed(report, protect, run: ScanSettings, eval_text: str | None, directory: Path, args):
    """The sweep of ``protect`` on a saved report's model that does not fit in memory, read block by block: the model
    checked first, in one pass over its blocks, to be the report's (its weights' identity) and to hold the list's super
    weights (``check_saved_streamed``); its lanes' hidden states beyond memory in ``directory``."""
    from .analysis.deploy.protect import check_saved_streamed
    from .analysis.detect.stream import stream_place
    from .models.checkpoint import load_streamed
    from .models.loading import DTYPES, resolve_device
    from .pipeline import quantize_streamed

    streamed = load_streamed(report.model.source, DTYPES[run.dtype], resolve_device(run.device))
    check_saved_streamed(streamed, report.model, protect, str(args.protect or directory / "report.json"))
    with _progress(_bars(args.quiet)) as progress:
        return quantize_streamed(streamed, protect, run, stream_place(streamed, run, directory, _memory(args)), eval_text, progress)


def _quant_protect(args, settings: ScanSettings, out: Path, formats: set[str]) -> int:
    """A model and its protect.json: the sweep alone, written as quantization.json / .txt / .png (no whole report)."""
    from .analysis.deploy.protect import check_model
    from .models.loading import load
    from .pipeline import quantize
    from .report.atomic import write_set
    from .report.plots import quantization_figure
    from .report.schema import load_protect, write_quantization
    from .report.text import quantization_text

    protect = load_protect(args.protect)
    _refuse_unless_fits(args.target, settings.dtype, "quant --protect", _memory(args))
    lm = load(args.target, dtype=settings.dtype, device=settings.device, log=_log(args.quiet))
    check_model(protect, lm, str(args.protect))
    eval_text = read_eval_file(settings.eval_file) if settings.eval_file else None
    with _progress(_bars(args.quiet)) as progress:
        result = quantize(lm, protect, settings, eval_text, progress)
    contents: dict[str, str | bytes] = {}
    if "json" in formats:
        contents["quantization.json"] = write_quantization(result) + "\n"
    if formats & {"txt", "html"}:
        contents["quantization.txt"] = quantization_text(result, None)
    if "png" in formats:
        contents["quantization.png"] = quantization_figure(result)
    written = write_set(out, contents, keep=True)  # one set; a report already in ``out`` stays
    if not args.quiet:
        print(quantization_text(result, None), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _log(quiet: bool):
    """Where loading and stage messages go; also silences transformers' own (its loading bar under --quiet and
    outside a terminal), since our messages say what matters in one line each."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # torchao, which transformers imports at every model load where the quantization engines are installed, warns on
    # stderr that its CUDA kernels do not load (on a CPU), and torch that the enums it registers are deprecated: not
    # ours to print.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if quiet or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    return (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))


def _bars(quiet: bool) -> bool:
    """No bars in a pipe, a log file or CI, and one set only in a multi-process launch."""
    from .launch import launch

    return not quiet and sys.stderr.isatty() and launch()[0] == 0


def _verify(args) -> int:
    """massact verify DIR: the scan again, with the settings report.json saved and verification on."""
    from .report.atomic import check_writable
    from .report.files import parse_formats
    from .report.schema import load_report

    saved = load_report(args.report_dir)  # every field checked while it is built
    settings = saved.settings.replace(
        verify=True, **_given(args, "sink_epsilon", "dtype", "device"),
        **({"eval_file": _eval_file(args.eval_file)} if args.eval_file else {})).check()
    texts = saved.corpus.spec
    check_writable(args.report_dir)
    texts.check()
    formats = parse_formats(args.format)
    if not _fits(saved.model.source, settings.dtype):  # the scan again, streamed as it was made
        return _run_streamed(saved.model.source, texts, settings, args.report_dir, formats, args.quiet, None, full=args.full,
                             verify=True, saved=saved)
    return _run(saved.model.source, texts, settings, args.report_dir, formats, args.quiet, verify=True, full=args.full,
                saved=saved)


def _memory(args) -> int | None:
    """The ``--memory`` limit in bytes (None: not given, the memory available)."""
    from .models.checkpoint import parse_size

    return parse_size(args.memory) if getattr(args, "memory", None) is not None else None


def _fits(model: str | None, dtype: str, memory: int | None = None) -> bool:
    """Whether the model fits in ``memory`` (None: the memory available): not a model directory whose weights in
    ``dtype`` exceed it."""
    from .models.checkpoint import available_memory, weights_bytes
    from .models.loading import DTYPES

    if model is None or not Path(model).is_dir():
        return True
    size, limit = weights_bytes(Path(model), DTYPES[dtype]), memory if memory is not None else available_memory()
    return size is None or limit is None or size <= limit


def _refuse_unless_fits(model: str | None, dtype: str, command: str, memory: int | None = None) -> None:
    """Refuse, in one line, a model directory whose weights exceed ``memory`` (None: the memory available):
    ``command`` runs the model in memory, which a streamed model does not fit."""
    from .models.checkpoint import available_memory, weights_bytes
    from .models.loading import DTYPES
    from .numbers import size as in_bytes

    if not _fits(model, dtype, memory):
        size, limit = weights_bytes(Path(model), DTYPES[dtype]), memory if memory is not None else available_memory()
        where = "--memory" if memory is not None else "the memory available"
        raise UsageError(f"{command} runs the model in memory, and its weights ({in_bytes(size)} in {dtype}) exceed "
                         f"{where} ({in_bytes(limit)}): scan it first (massact scan, which streams it), then run "
                         f"massact quant on the report's folder")


def _show(args) -> int:
    from .report import summary
    from .report.files import saved_text
    from .report.schema import load_report
    from .report.text import print_report, print_section, terminal

    if args.section is not None:
        try:
            section(args.section)
        except KeyError:
            raise UsageError(f"--section takes one of: {names()}; got {args.section!r}") from None
    report = load_report(args.report_dir)  # every field checked while it is built
    if args.summary:
        summary.show(report, terminal())
    elif args.section is not None:
        print_section(report, section(args.section).key, terminal())
    else:
        # The report's own report.txt where it is there: laying out its 600 lines again costs more than reading them.
        saved = saved_text(args.report_dir)
        if saved is not None:
            sys.stdout.write(saved)
        else:
            print_report(report, terminal())
    return 0


def _compare(args) -> int:
    from .report.atomic import check_writable
    from .report.compare import write_compare

    if (args.out / "report.json").exists():  # the comparison's set would replace the report's files
        raise UsageError(f"--out {args.out} holds a report (report.json); write the comparison to another directory")
    check_writable(args.out)
    for path in write_compare(args.report_dirs, args.out):
        print(f"wrote {path}")
    return 0


def _eval_file(path: str | None) -> str | None:
    """--eval-file, read now (bad input fails before the model loads) and kept as an absolute path in the settings."""
    if path is None:
        return None
    read_eval_file(path)
    return str(Path(path).resolve())


def _run(model, texts, settings: ScanSettings, out: Path, formats: set[str], quiet: bool, *, verify: bool | None,
         resume: bool = False, device_map: str | None = None, trust_remote_code: bool = False, full: bool = False,
         saved: Report | None = None) -> int:
    """Load, scan with ``settings`` and write the report. ``verify`` None: verify where the interventions' estimated time fits
    (``analysis.causal.budget``). The
    terminal gets one screen, or with ``full`` the whole report. ``saved``: the report this scan re-runs (``massact
    verify``), whose model the loaded one must be; its quantization sweep is kept if this scan would measure it on
    the same inputs."""
    from .models.loading import load
    from .pipeline import scan

    log = _log(quiet)
    lm = load(model, dtype=settings.dtype, device=settings.device, log=log, device_map=device_map,
              trust_remote_code=trust_remote_code)
    quantization = None
    if saved is not None:
        from .analysis.results import check_report_model

        check_report_model(saved, lm, str(out / "report.json"))
        quantization = saved.deploy.quantization
    with _progress(_bars(quiet)) as progress:
        report = scan(lm, texts, settings.replace(verify=bool(verify)), checkpoint=out / "scan-state.pt", resume=resume,
                      progress=progress, quantization=quantization, auto_verify=verify is None)
    if report is None:  # another process of a multi-process launch writes the report
        return 0
    if quantization is not None and report.deploy.quantization is quantization:
        log("kept the saved quantization sweep: the same protect list, evaluation text, dtype, device and grid")
    return _write(report, out, formats, quiet, full)


def _write(report: Report, out: Path, formats: set[str], quiet: bool, full: bool) -> int:
    """Write ``report``'s files into ``out``, show one screen (or with ``full`` the whole report) and list the paths."""
    from .report import summary
    from .report.files import write_report
    from .report.text import print_report, terminal

    written = write_report(report, out, formats)
    if full and not quiet:
        print_report(report, terminal())
    elif not quiet:
        summary.show(report, terminal())
    for line in summary.written_lines(written):
        print(line)
    return 0


@contextmanager
def _progress(show: bool):
    """A rich progress bar per stage on stderr (or nothing), in the shape massact.scan's ``progress`` takes."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bars:
        def stage(description: str, total: int | None):
            task = bars.add_task(description, total=total)
            return lambda description=None: bars.update(task, advance=1, **({"description": description} if description else {}))

        yield stage
