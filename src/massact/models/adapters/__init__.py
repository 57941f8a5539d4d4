"""Adapter registry: the model's ``config.model_type`` picks the family."""

from __future__ import annotations

from ...errors import UsageError
from . import gpt2, llama
from .base import Adapter

ADAPTERS: tuple[Adapter, ...] = (gpt2.ADAPTER, llama.ADAPTER)


def supported() -> str:
    return "; ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UsageError(
        f"architecture {model_type!r} is not supported; supported families: {supported()}"
        " (a new family is one Adapter in massact/models/adapters/)"
    )
