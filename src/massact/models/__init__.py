"""Loading a model and its family's adapter (``loading``, ``adapters``), its weights' identity (``identity``) and
what a report says of it (``info``).

The names below are imported on first use, so that a torch-free module here (``info``) does not load torch."""

_API = {"ADAPTERS": ".adapters", "Adapter": ".adapters", "adapter_for": ".adapters", "DEFAULT_NAME": ".loading",
        "LoadedModel": ".loading", "load": ".loading", "wrap": ".loading"}

__all__ = ["ADAPTERS", "Adapter", "DEFAULT_NAME", "LoadedModel", "adapter_for", "load", "wrap"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_API[name], __name__), name)
    globals()[name] = value
    return value
