"""Write a report's files: each file whole, and the set of them as one (see ``write_set`` in report/atomic.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..analysis.results import Report
from ..errors import UsageError
from .atomic import write_set

FORMATS = ("txt", "json", "html", "png")
SAME_SET = 1.0  # seconds: report.txt and report.json written as one set are written well within this of each other


def slug(name: str) -> str:
    """A directory name for a model: 'HuggingFaceTB/SmolLM2-135M' -> 'HuggingFaceTB--SmolLM2-135M'."""
    name = name.rstrip("/\\")
    if os.sep in name and Path(name).exists():
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-.") or "model"


def parse_formats(text: str) -> set[str]:
    """'txt,json' -> {'txt', 'json'}; an unknown format is a usage error."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(FORMATS)
    if unknown or not chosen:
        raise UsageError(f"--format takes a comma-separated list of {', '.join(FORMATS)}; got {text!r}")
    return chosen


def write_report(report: Report, out: Path, formats: frozenset[str] | set[str] = frozenset(FORMATS)) -> list[Path]:
    """The chosen files in ``out`` (created): report.txt, report.json (and protect.json), report.html, the PNG figures."""
    from ..analysis.results import build_protect
    from .html import to_html
    from .plots import figures
    from .schema import write_protect
    from .schema import write_report as write_report_json
    from .text import to_text

    pngs = figures(report) if formats & {"html", "png"} else {}
    contents: dict[str, str | bytes] = {}
    if "json" in formats:
        contents["report.json"] = write_report_json(report) + "\n"
        contents["protect.json"] = write_protect(build_protect(report)) + "\n"
    if "txt" in formats:
        contents["report.txt"] = to_text(report)
    if "html" in formats:
        contents["report.html"] = to_html(report, pngs)
    if "png" in formats:
        contents.update(pngs)
    return write_set(out, contents)


def saved_text(directory: Path) -> str | None:
    """``directory``/report.txt where it is the text of the report.json beside it: both written in one set (their
    modification times within ``SAME_SET``; a report.json changed later is newer), so that ``massact show`` prints it
    without laying out the report again. None where it is missing or does not belong to that report.json."""
    text, data = Path(directory) / "report.txt", Path(directory) / "report.json"
    try:
        if abs(text.stat().st_mtime - data.stat().st_mtime) > SAME_SET:
            return None
        return text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
