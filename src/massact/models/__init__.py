from .adapters import ADAPTERS, Adapter, adapter_for
from .loading import DEFAULT_NAME, LoadedModel, load, wrap

__all__ = ["ADAPTERS", "Adapter", "DEFAULT_NAME", "LoadedModel", "adapter_for", "load", "wrap"]
