"""Write a report's files: each file whole, and the set of them as one (see ``write_set`` in report/atomic.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..analysis.results import Report
from ..errors import UsageError
from .atomic import write_set

FORMATS = ("txt", "json", "html", "png")
# report.txt's last line names the report.json it was laid out from by its digest: times cannot tell (a copy keeps
# them, a clone resets them, an edit can fall within the same second).
LAID_OUT_FROM = "Laid out from report.json sha256 "


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
        text = to_text(report)
        if "report.json" in contents:
            text += f"{LAID_OUT_FROM}{_digest(contents['report.json'].encode('utf-8'))}\n"
        contents["report.txt"] = text
    profile = _same_model_profile(out, report.model.weights_sha256)
    if profile is not None:  # a profile of another model's weights goes with the previous set
        contents["profile.json"] = profile
    if "html" in formats:
        contents["report.html"] = to_html(report, pngs)
    if "png" in formats:
        contents.update(pngs)
    return write_set(out, contents)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _same_model_profile(out: Path, weights_sha256: str | None) -> bytes | None:
    """``out``/profile.json as it is, where it was made from the same weights as this report; else None."""
    try:
        data = (Path(out) / "profile.json").read_bytes()
        made_from = json.loads(data).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return data if weights_sha256 is not None and made_from == weights_sha256 else None


def saved_text(directory: Path) -> str | None:
    """``directory``/report.txt without its last line, where that line names the report.json beside it by its
    digest, so that ``massact show`` prints it without laying out the report again. None where either is missing, or
    the text was laid out from another report.json (edited, replaced, or copied in from elsewhere)."""
    try:
        text = (Path(directory) / "report.txt").read_text(encoding="utf-8")
        digest = _digest((Path(directory) / "report.json").read_bytes())
    except (OSError, UnicodeDecodeError):
        return None
    body, _, last = text.removesuffix("\n").rpartition("\n")
    return body + "\n" if last == f"{LAID_OUT_FROM}{digest}" else None
