"""Read a saved report.json, checking every field ``massact verify`` and ``massact compare`` use before any work:
a hand-edited or foreign file is refused in one line that names the field."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError

Check = tuple[Callable[[object], bool], str]  # the test, and what the field must be


def _number(none: bool = False, positive: bool = False) -> Check:
    def test(value) -> bool:
        if value is None:
            return none  # JSON has no inf or nan: the report writes null for them
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return not positive or (math.isfinite(value) and value > 0)

    what = "a positive number" if positive else "a number"
    return test, what + (" or null" if none else "")


def _integer(least: int = 0, none: bool = False) -> Check:
    def test(value) -> bool:
        if value is None:
            return none
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    return test, f"an integer >= {least}" + (" or null" if none else "")


def _kind(kind: type, none: bool = False, nonempty: bool = False) -> Check:
    def test(value) -> bool:
        if value is None:
            return none
        return isinstance(value, kind) and not isinstance(value, bool) and (not nonempty or len(value) > 0)

    name = {dict: "an object", list: "a list", str: "a string", bool: "true or false"}[kind]
    return test, ("a non-empty " + name.removeprefix("a ").removeprefix("an ") if nonempty else name) + (" or null" if none else "")


def _choice(*options: str) -> Check:
    return (lambda value: value in options), "one of " + ", ".join(options)


_BOOL_OR_NULL: Check = ((lambda value: value is None or isinstance(value, bool)), "true, false or null")

# Field paths ("[]": every item of a list) and what they must hold. A path under a null (e.g. a report without
# verification) is not checked; its parent's own check says whether null is allowed.
FIELDS: dict[str, Check] = {
    "model": _kind(dict),
    "model.name": _kind(str),
    "model.architecture": _kind(str),
    "model.n_layers": _integer(1),
    "model.d_model": _integer(1),
    "model.dtype": _choice("float32", "bfloat16", "float16"),
    "model.source": _kind(str, none=True),
    "criterion": _kind(dict),
    "criterion.min_abs": _number(positive=True),
    "criterion.min_ratio": _number(positive=True),
    "corpus": _kind(dict),
    "corpus.spec": _kind(dict),
    "corpus.spec.texts": _kind(list),
    "corpus.spec.texts[]": _kind(str),
    "corpus.spec.file": _kind(str, none=True),
    "corpus.spec.dataset": _kind(str, none=True),
    "corpus.spec.max_texts": _integer(1, none=True),
    "corpus.spec.max_length": _integer(2, none=True),
    "layers": _kind(list, nonempty=True),
    "layers[]": _kind(dict),
    "layers[].median": _number(none=True),
    "layers[].top": _kind(list),
    "layers[].top[].value": _number(none=True),
    "massive": _kind(list),
    "massive[].value": _number(none=True),
    "massive[].ratio": _number(none=True),
    "dims": _kind(list),
    "dims[].dim": _integer(0),
    "dims[].removed_at": _kind(list),
    "origin": _kind(list),
    "origin[].role": _choice("birth", "removal"),
    "origin[].dim": _integer(0),
    "origin[].layer": _integer(0),
    "origin[].writer": _kind(str),
    "attribution": _kind(list),
    "attribution[].role": _choice("birth", "removal"),
    "attribution[].dim": _integer(0),
    "attribution[].output": _number(none=True),
    "attribution[].neurons": _kind(list, nonempty=True),
    "attribution[].neurons[].neuron": _integer(0),
    "attribution[].neurons[].share": _number(none=True),
    "attribution[].neurons_for_90pct": _integer(0),
    "attribution[].super_weight": _kind(dict),
    "attribution[].super_weight.matrix": _kind(str),
    "attribution[].super_weight.row": _integer(0),
    "attribution[].super_weight.col": _integer(0),
    "attribution[].super_weight.value": _number(none=True),
    "attribution[].super_weight.rank": _integer(1),
    "verification": _kind(dict, none=True),
    "verification.baseline_perplexity": _number(none=True),
    "verification.interventions": _kind(list),
    "verification.interventions[].name": _kind(str),
    "verification.interventions[].confirms": _BOOL_OR_NULL,
    "verification.interventions[].perplexity_ratio": _number(none=True),
}

_ABSENT = object()


def _values(data, path: str, prefix: str = ""):
    """(concrete path, value) for every place ``path`` names in ``data``; _ABSENT where a key is missing."""
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    key = head.removesuffix("[]")
    if not isinstance(data, dict):
        return
    here = f"{prefix}.{key}" if prefix else key
    value = data.get(key, _ABSENT)
    if many:
        if not isinstance(value, list):
            return  # the list's own check reports it
        items = [(f"{here}[{i}]", item) for i, item in enumerate(value)]
    else:
        items = [(here, value)]
    for name, item in items:
        if not rest:
            yield name, item
        elif item is not None and item is not _ABSENT:
            yield from _values(item, rest, name)


def report_problem(data) -> str | None:
    """The first field of ``data`` that is missing or not what a massact report holds there, in words; None when
    every field ``FIELDS`` names is right."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    for path, (test, what) in FIELDS.items():
        for name, value in _values(data, path):
            if value is _ABSENT:
                return f"no field {name}"
            if not test(value):
                return f"field {name} must be {what}, not {json.dumps(value)[:40]}"
    return None


def load_report(directory: Path) -> dict:
    """``directory``/report.json, checked (see ``report_problem``); one ``UsageError`` line naming the bad field."""
    path = Path(directory) / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"{path}: not a massact report ({error.strerror or error})") from None
    except ValueError as error:  # not UTF-8, or not JSON
        raise UsageError(f"{path}: not a massact report (not JSON: {str(error).splitlines()[0]})") from None
    problem = report_problem(data)
    if problem:
        raise UsageError(f"{path}: not a massact report ({problem})")
    return data
