"""Fields a report's dataclasses gained after their format's version was set: written only where they differ from
their default, and read as the default where a file has none, so that files without them stay readable and the
reports of models that never set them stay as they were (hyper-connections' streams, for one)."""

from __future__ import annotations

import dataclasses
from typing import Any

_KEY = "optional"


def optional(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a ``default`` (or a ``factory`` of it), left out of the JSON while it holds that
    default."""
    return dataclasses.field(default=default, default_factory=factory, metadata={_KEY: True})


def is_optional(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(_KEY))


def default_of(field: dataclasses.Field) -> Any:
    """The value an optional field takes where a file has none."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
