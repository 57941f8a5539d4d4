"""massact: where a transformer's massive activations come from, and what writes them."""

__version__ = "0.1.0"

# The API is imported on first use, so that `import massact` (and the command line's start, where Ctrl-C must stay
# one line) does not wait for torch and transformers.
_API = {"scan": ".pipeline", "profile": ".pipeline", "Profile": ".analysis.profile.results", "Report": ".analysis.results",
        "Trace": ".capture.hooks", "LoadedModel": ".models.loading", "load": ".models.loading", "wrap": ".models.loading"}

__all__ = ["LoadedModel", "Profile", "Report", "Trace", "__version__", "load", "masks", "profile", "scan", "wrap"]


def __getattr__(name: str):
    if name == "masks":  # a module of its own: massact.masks.live, massact.masks.Hook
        from importlib import import_module

        return import_module(".masks", __name__)
    if name not in _API:
        raise AttributeError(f"module 'massact' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_API[name], __name__), name)
    globals()[name] = value
    return value
