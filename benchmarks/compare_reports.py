"""Compare two report.json files field by field: everything but floats must be identical, floats may differ by a
relative tolerance (float noise from batching and from running passes from a block on), and so may the numbers
printed inside a sentence (the conclusion's), the words around them being identical. Both files are read and checked by
massact's schema first, a version 1 report converted to the current version.

    .venv/bin/python benchmarks/compare_reports.py /tmp/base-report/report.json massact-report/report.json
    .venv/bin/python benchmarks/compare_reports.py A B --rel 1e-4 --ignore versions,settings

Prints each difference (path, the two values, the relative gap) and a summary line; exits 1 when a non-float field
differs or a float differs beyond the tolerance. Fields named in --ignore (at any depth) are skipped.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from massact.errors import UsageError
from massact.report.schema import parse, read_report, to_data

IGNORED = ("versions", "settings", "seconds", "device")  # what a run records about itself, not about the model


def differences(a: Any, b: Any, rel: float, ignore: set[str], path: str = "") -> Iterator[tuple[str, Any, Any, float]]:
    """(path, a, b, relative gap) for each leaf that differs: gap inf for a non-float difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            if key not in a or key not in b:
                yield f"{path}.{key}", a.get(key, "<missing>"), b.get(key, "<missing>"), math.inf
            else:
                yield from differences(a[key], b[key], rel, ignore, f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}[len]", len(a), len(b), math.inf
        for index, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, rel, ignore, f"{path}[{index}]")
    elif isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool) or isinstance(b, bool):
            yield path, a, b, math.inf
            return
        if math.isnan(a) and math.isnan(b) or a == b:
            return
        gap = abs(a - b) / max(abs(a), abs(b))
        yield path, a, b, gap
    elif isinstance(a, str) and isinstance(b, str) and a != b:
        yield path, a, b, _text_gap(a, b)
    elif a != b:
        yield path, a, b, math.inf


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def _text_gap(a: str, b: str) -> float:
    """Two sentences that differ only in the printed numbers: the largest relative gap between those numbers (so
    "perplexity x51,127.35" against "x51,127.68" is float noise at 6.5e-06); any other difference: inf."""
    if _NUMBER.split(a) != _NUMBER.split(b):
        return math.inf
    gaps = [0.0]
    for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
        u, v = float(x.replace(",", "")), float(y.replace(",", ""))
        if u != v:
            gaps.append(abs(u - v) / max(abs(u), abs(v)))
    return max(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--rel", type=float, default=1e-4, help="relative tolerance for floats (default 1e-4)")
    parser.add_argument("--ignore", default=",".join(IGNORED), help=f"fields to skip, comma-separated (default {','.join(IGNORED)})")
    parser.add_argument("--show", type=int, default=40, help="differences to print at most")
    args = parser.parse_args()
    # Each read and checked by the schema (a version 1 report converted to the current version), then compared as
    # the current version writes it.
    a, b = (to_data(read_report(parse(path, "a massact report"), str(path))) for path in (args.first, args.second))
    found = list(differences(a, b, args.rel, set(filter(None, args.ignore.split(",")))))
    exact = [d for d in found if d[3] == math.inf]
    beyond = [d for d in found if args.rel < d[3] < math.inf]
    within = [d for d in found if d[3] <= args.rel]
    for path, x, y, gap in (exact + beyond)[: args.show]:
        print(f"DIFFERS {path}: {str(x)[:80]!s} | {str(y)[:80]!s}" + (f" (rel {gap:.2e})" if gap < math.inf else ""))
    largest = max((d[3] for d in within), default=0.0)
    print(f"{len(exact)} non-float difference(s), {len(beyond)} float(s) beyond rel {args.rel:g}, {len(within)} float(s) within "
          f"it (largest rel gap {largest:.2e})")
    return 1 if exact or beyond else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as error:  # a file that is not a report: one line
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
