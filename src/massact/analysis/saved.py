"""A saved report.json read back into the result dataclasses, so that a command can add to it without scanning again."""

from __future__ import annotations

import dataclasses
import types
import typing

from ..errors import UsageError
from .results import Report


def from_data(kind, data):
    """``data`` (parsed JSON) as an instance of the annotated type ``kind``: dataclasses field by field, lists,
    dicts (JSON's string keys back to int where the type says so), optionals; null where a float is expected is nan
    (the JSON writer turned inf and nan into null)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        return from_data(next(a for a in args if a is not type(None)), data)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = {f.name: from_data(hints[f.name], data[f.name]) for f in dataclasses.fields(kind) if f.name in data}
        return kind(**fields)
    if origin is list:
        return [from_data(args[0], item) for item in data] if args else list(data)
    if origin is dict:
        key, value = args if args else (str, typing.Any)
        return {(int(k) if key is int else k): from_data(value, v) for k, v in data.items()}
    if kind is float:
        return float("nan") if data is None else float(data)
    return data


def as_report(data: dict, where: str = "report.json") -> Report:
    """A saved report.json, read and checked by ``massact.report.load.load_report``, as a Report; a field of the
    wrong shape is a usage error (one line)."""
    try:
        return from_data(Report, data)
    except (ValueError, KeyError, TypeError, StopIteration) as error:
        raise UsageError(f"{where}: not a massact report ({type(error).__name__}: {error})") from None
