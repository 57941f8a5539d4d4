"""massact's command line: a thin layer over ``massact.scan``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError
from .settings import check_options

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="massact", description="Find a transformer's massive activations and what writes them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    scan = commands.add_parser("scan", help="scan a model, trace its massive activations, write the report")
    scan.add_argument("model", nargs="?", help="hub id, model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    scan.add_argument("--text", action="append", help="a text to scan (repeatable; default: built-in sentences)")
    scan.add_argument("--file", help="UTF-8 file of texts: one per line, or paragraphs separated by blank lines")
    scan.add_argument("--out", type=Path, help="output directory (default: ./massact-report/<model>/)")
    scan.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    scan.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    scan.add_argument("--device-map", help="spread a large model over the devices (accelerate): auto, balanced, sequential")
    scan.add_argument("--trust-remote-code", action="store_true",
                      help="let the model directory's own Python code define its classes (runs that code)")
    scan.add_argument("--top-k", type=int, default=5, help="largest activations listed per block")
    scan.add_argument("--min-abs", type=float, default=100.0, help="massive: |a| at least this")
    scan.add_argument("--min-ratio", type=float, default=1000.0, help="massive: |a| at least this times the median |a|")
    scan.add_argument("--top-neurons", type=int, default=10, help="neurons listed in the attribution")
    scan.add_argument("--chain-depth", type=int, default=3,
                      help="links followed back from the writing neuron toward the token in the trigger chain")
    scan.add_argument("--super-weight-steps", type=int, default=5,
                      help="super weights zeroed one after another per dim, at most (with --verify)")
    scan.add_argument("--dataset", help="Hugging Face dataset NAME[:CONFIG[:SPLIT]]: a save_to_disk directory, a local folder of data files, or a hub name")
    scan.add_argument("--max-texts", type=int, help="scan at most this many texts")
    scan.add_argument("--max-length", type=int, help="split texts longer than this many tokens into windows (default: refuse texts longer than the context)")
    scan.add_argument("--checkpoint-every", type=int, default=50,
                      help="write the scan's merged state to OUT/scan-state.pt every N batches (removed when the scan ends)")
    scan.add_argument("--resume", action="store_true", help="continue an interrupted scan from OUT/scan-state.pt")
    scan.add_argument("--batch-size", type=int, default=8, help="texts per forward pass of the scan (padding is never counted)")
    scan.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                      help="confirm by intervention and measure attention sinks (default: on for models up to 3B parameters)")
    scan.add_argument("--eval-file", help="UTF-8 text for perplexity (default: the shipped public-domain sample)")
    scan.add_argument("--sink-epsilon", type=float, default=0.3,
                      help="a head is a sink head when its average attention on a sink token exceeds this (Gu et al. 2024)")
    scan.add_argument("--format", default="txt,json,html,png", help="outputs to write, comma-separated: txt,json,html,png")
    scan.add_argument("--quiet", action="store_true", help="no report on the terminal, no progress bars: only the paths written")
    scan.add_argument("--quant", action="store_true", help="also measure what weight and activation quantization do (section 8)")
    _quant_options(scan)
    quant = commands.add_parser("quant", help="quantization sweep and precision headroom, on a model or a saved report")
    quant.add_argument("target", nargs="?", help="a report directory (report.json), or a model as for scan (default: embedded SmolLM2-135M-Instruct)")
    quant.add_argument("--protect", type=Path, help="a protect.json to use instead of scanning the model (with a MODEL)")
    quant.add_argument("--out", type=Path, help="output directory for a MODEL (default: ./massact-report/<model>/); a report directory is updated in place")
    quant.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    quant.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    quant.add_argument("--eval-file", help="UTF-8 text for perplexity (default: the shipped public-domain sample)")
    quant.add_argument("--format", default="txt,json,html,png", help="outputs to write, comma-separated: txt,json,html,png")
    quant.add_argument("--quiet", action="store_true", help="no report on the terminal, no progress bars: only the paths written")
    _quant_options(quant)
    verify = commands.add_parser("verify", help="re-run a saved report with verification, writing it back in place")
    verify.add_argument("report_dir", type=Path, help="a directory holding report.json from massact scan")
    verify.add_argument("--eval-file", help="UTF-8 text for perplexity (default: the shipped public-domain sample)")
    verify.add_argument("--sink-epsilon", type=float, default=0.3,
                        help="a head is a sink head when its average attention on a sink token exceeds this (Gu et al. 2024)")
    verify.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    verify.add_argument("--format", default="txt,json,html,png", help="outputs to write, comma-separated: txt,json,html,png")
    verify.add_argument("--quiet", action="store_true", help="no report on the terminal, no progress bars: only the paths written")
    compare = commands.add_parser("compare", help="put saved reports side by side in one page")
    compare.add_argument("report_dirs", type=Path, nargs="+", help="directories holding report.json")
    compare.add_argument("--out", type=Path, default=Path("massact-report") / "compare", help="output directory")
    return parser


def _quant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant-grid", default="default", help="quantization settings: default (a few minutes on a small CPU) or full")
    parser.add_argument("--clip-z", type=float, help="z-score at which the held-out variant clips the remaining weights (default 4)")
    parser.add_argument("--block-size", type=int, help="entries per flat block of the block-wise RTN settings (default 16384)")


def main(argv: list[str] | None = None) -> int:
    interrupted = _on_interrupt()
    try:
        args = build_parser().parse_args(argv)
        return {"scan": _scan, "verify": _verify, "compare": _compare, "quant": _quant}[args.command](args)
    except UsageError as error:
        print(f"massact: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException:
        # Ctrl-C can land inside a library's lazy import, which then raises its own error (ModuleNotFoundError)
        # instead of KeyboardInterrupt: whatever it became, an interrupt is one line and exit 130.
        if not interrupted:
            raise
        print("massact: interrupted", file=sys.stderr)
        return 130


def _on_interrupt() -> list[int]:
    """Note every SIGINT (in the returned list) and raise KeyboardInterrupt, as Python's own handler does."""
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    return seen


VERIFY_MAX_PARAMETERS = 3_000_000_000  # interventions re-run the model a few dozen times: fine up to a few B


def _scan(args) -> int:
    from .models.loading import DEFAULT_NAME
    from .report.atomic import check_writable
    from .report.files import parse_formats, slug
    from .texts import Corpus

    check_options(**{name: getattr(args, name) for name in ("top_k", "top_neurons", "batch_size", "max_texts", "max_length",
                                                              "checkpoint_every", "chain_depth", "super_weight_steps",
                                                              "min_abs", "min_ratio", "sink_epsilon")})
    formats = parse_formats(args.format)
    # Absolute, so that `massact verify` can read the file again from anywhere.
    file = str(Path(args.file).resolve()) if args.file and Path(args.file).is_file() else args.file
    texts = Corpus(tuple(args.text or ()), file, args.dataset, args.max_texts)
    texts.check()  # read input before the slow model load, so bad input fails fast
    eval_text = _read_eval(args.eval_file)
    out = args.out or Path("massact-report") / slug(args.model or DEFAULT_NAME)
    check_writable(out)  # before the slow model load and scan
    settings = dict(top_k=args.top_k, min_abs=args.min_abs, min_ratio=args.min_ratio, top_neurons=args.top_neurons,
                    chain_depth=args.chain_depth, super_weight_steps=args.super_weight_steps,
                    batch_size=args.batch_size, max_length=args.max_length, checkpoint=out / "scan-state.pt",
                    checkpoint_every=args.checkpoint_every, resume=args.resume, sink_epsilon=args.sink_epsilon,
                    **_quant_settings(args))
    return _run(args.model, texts, settings, args.verify, eval_text, args.dtype, args.device, out, formats, args.quiet,
                args.device_map, args.trust_remote_code)


def _quant_settings(args) -> dict:
    """The scan's quantization keywords from --quant, --quant-grid, --clip-z, --block-size, checked before any loading."""
    from .analysis.deploy.quant import grid

    grid(args.quant_grid)  # an unknown grid name fails here, before the model loads
    check_options(block_size=args.block_size, clip_z=args.clip_z)
    return dict(quant=getattr(args, "quant", True), quant_grid=args.quant_grid, clip_z=args.clip_z, block_size=args.block_size)


def _quant(args) -> int:
    """massact quant: on a saved report (updated in place), on a model with a protect.json (no scan), or on a model
    (scan without verification, then the sweep)."""
    from .models.loading import DEFAULT_NAME
    from .report.atomic import check_writable
    from .report.files import parse_formats, slug
    from .texts import Corpus

    settings = _quant_settings(args)
    formats = parse_formats(args.format)
    eval_text = _read_eval(args.eval_file)
    target = Path(args.target) if args.target else None
    if target is not None and target.is_dir() and not (target / "config.json").is_file():
        if not (target / "report.json").is_file():
            raise UsageError(f"{target}: no report.json (not a massact report directory, nor a model directory)")
        return _quant_report(target, args, settings, eval_text, formats)
    out = args.out or Path("massact-report") / slug(args.target or DEFAULT_NAME)
    check_writable(out)  # before the slow model load and sweep
    if args.protect is not None:
        return _quant_protect(args, settings, eval_text, out, formats)
    return _run(args.target, Corpus(()), settings, False, eval_text, args.dtype, args.device, out, formats, args.quiet)


def _quant_report(directory: Path, args, settings: dict, eval_text, formats: set[str]) -> int:
    from .analysis.deploy import protect as protect_list
    from .analysis.deploy.precision import headroom
    from .analysis.deploy.quant import measure
    from .models.loading import load
    from .report.files import write_report
    from .report.schema import load_protect, load_report
    from .report.text import quantization_text

    report = load_report(directory)  # every field checked while it is built
    protect = load_protect(args.protect) if args.protect else protect_list.build(report)
    lm = load(report.model.source, dtype=report.model.dtype, device=args.device, log=_log(args.quiet))
    protect_list.check_model(protect, lm, f"{directory / 'report.json'}" if args.protect is None else str(args.protect))
    with _progress(_bars(args.quiet)) as progress:
        report.quantization = measure(lm, protect, eval_text, settings["quant_grid"], settings["clip_z"], settings["block_size"], progress)
    report.precision = headroom(report.layers)
    written = write_report(report, directory, formats)
    if not args.quiet:
        print(quantization_text(report.quantization, report.precision), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _quant_protect(args, settings: dict, eval_text, out: Path, formats: set[str]) -> int:
    """A model and its protect.json: the sweep alone, written as quantization.json / .txt / .png (no whole report)."""
    import json

    from .analysis.deploy.quant import measure
    from .models.loading import load
    from .analysis.deploy.protect import check_model
    from .report.atomic import write_set
    from .report.plots import quantization_figure
    from .report.schema import load_protect, to_data
    from .report.text import quantization_text

    protect = load_protect(args.protect)
    lm = load(args.target, dtype=args.dtype, device=args.device, log=_log(args.quiet))
    check_model(protect, lm, str(args.protect))
    with _progress(_bars(args.quiet)) as progress:
        result = measure(lm, protect, eval_text, settings["quant_grid"], settings["clip_z"], settings["block_size"], progress)
    contents: dict[str, str | bytes] = {}
    if "json" in formats:
        contents["quantization.json"] = json.dumps({"quantization": to_data(result)}, indent=2, ensure_ascii=False) + "\n"
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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    return (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))


def _bars(quiet: bool) -> bool:
    """No bars in a pipe, a log file or CI, and one set only in a multi-process launch."""
    return not quiet and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def _verify(args) -> int:
    from .report.atomic import check_writable
    from .report.schema import load_report
    from .texts import Corpus

    saved = load_report(args.report_dir)  # every field checked: one line naming a bad one
    spec = saved.corpus.spec
    settings = dict(top_k=len(saved.layers[0].top) or 5, min_abs=saved.criterion.min_abs, min_ratio=saved.criterion.min_ratio,
                    max_length=spec.max_length, sink_epsilon=args.sink_epsilon)
    check_options(sink_epsilon=args.sink_epsilon)
    texts = Corpus(tuple(spec.texts), spec.file, spec.dataset, spec.max_texts)
    from .report.files import parse_formats

    check_writable(args.report_dir)
    texts.check()
    formats = parse_formats(args.format)
    eval_text = _read_eval(args.eval_file)
    return _run(saved.model.source, texts, settings, True, eval_text, saved.model.dtype, args.device, args.report_dir, formats,
                args.quiet)


def _compare(args) -> int:
    from .report.atomic import check_writable
    from .report.compare import write_compare

    if (args.out / "report.json").exists():  # the comparison's set would replace the report's files
        raise UsageError(f"--out {args.out} holds a report (report.json); write the comparison to another directory")
    check_writable(args.out)
    for path in write_compare(args.report_dirs, args.out):
        print(f"wrote {path}")
    return 0


def _read_eval(path: str | None) -> str | None:
    if path is None:
        return None
    from .texts import read_text_file

    return "\n\n".join(read_text_file(path))


def _run(model, texts, settings, verify, eval_text, dtype, device, out: Path, formats: set[str], quiet: bool,
         device_map: str | None = None, trust_remote_code: bool = False) -> int:
    from .pipeline import scan
    from .models.loading import load
    from .report.files import write_report
    from .report.text import print_report, terminal

    log = _log(quiet)
    lm = load(model, dtype=dtype, device=device, log=log, device_map=device_map, trust_remote_code=trust_remote_code)
    if verify is None:
        verify = sum(p.numel() for p in lm.model.parameters()) <= VERIFY_MAX_PARAMETERS
        if not verify:
            log("skipping verification for a model this large; pass --verify to run it")
    with _progress(_bars(quiet)) as progress:
        report = scan(lm, texts, verify=verify, eval_text=eval_text, progress=progress, **settings)
    if report is None:  # another process of a multi-process launch writes the report
        return 0
    written = write_report(report, out, formats)
    if not quiet:
        print_report(report, terminal())
    for path in written:
        print(f"wrote {path}")
    return 0


@contextmanager
def _progress(show: bool):
    """A rich progress bar per stage on stderr (or nothing), in the shape massact.scan's ``progress`` takes."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bars:
        def stage(description: str, total: int | None):
            task = bars.add_task(description, total=total)
            return lambda: bars.advance(task)

        yield stage
