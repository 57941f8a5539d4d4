"""massact's command line: a thin layer over ``massact.scan``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UsageError

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
    scan.add_argument("--top-k", type=int, default=5, help="largest activations listed per block")
    scan.add_argument("--min-abs", type=float, default=100.0, help="massive: |a| at least this")
    scan.add_argument("--min-ratio", type=float, default=1000.0, help="massive: |a| at least this times the median |a|")
    scan.add_argument("--top-neurons", type=int, default=10, help="neurons listed in the attribution")
    scan.add_argument("--quiet", action="store_true", help="print only the paths written")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _scan(args)
    except UsageError as error:
        print(f"massact: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("massact: interrupted", file=sys.stderr)
        return 130


def _scan(args) -> int:
    from .analysis.pipeline import scan
    from .models.loading import DEFAULT_NAME, load
    from .report.files import slug, write_report
    from .report.text import print_report, terminal
    from .texts import gather_texts

    for option in ("top_k", "top_neurons"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1")
    texts = gather_texts(args.text, args.file)  # read input before the slow model load, so bad input fails fast
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own messages say what matters, in one line each
    if args.quiet or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    lm = load(args.model, dtype=args.dtype, device=args.device, log=log)
    report = scan(lm, texts, top_k=args.top_k, min_abs=args.min_abs, min_ratio=args.min_ratio, top_neurons=args.top_neurons)
    out = args.out or Path("massact-report") / slug(args.model or DEFAULT_NAME)
    written = write_report(report, out)
    if not args.quiet:
        print_report(report, terminal())
    for path in written:
        print(f"wrote {path}")
    return 0
