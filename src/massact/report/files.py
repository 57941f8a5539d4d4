"""Write a report's files. Each file is written whole to a temporary name, then renamed: never half a report."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..analysis.results import Report
from .text import to_text


def slug(name: str) -> str:
    """A directory name for a model: 'HuggingFaceTB/SmolLM2-135M' -> 'HuggingFaceTB--SmolLM2-135M'."""
    name = name.rstrip("/\\")
    if os.sep in name and Path(name).exists():
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-.") or "model"


def write_atomic(path: Path, content: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(content, encoding="utf-8")
    os.replace(partial, path)


def write_report(report: Report, out: Path) -> list[Path]:
    """report.json and report.txt in ``out`` (created); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in (("report.json", report.to_json() + "\n"), ("report.txt", to_text(report))):
        write_atomic(out / name, content)
        written.append(out / name)
    return written
