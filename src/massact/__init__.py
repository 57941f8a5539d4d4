"""massact: where a transformer's massive activations come from, and what writes them."""

__version__ = "0.1.0"

from .pipeline import scan  # noqa: E402
from .analysis.results import Report  # noqa: E402
from .capture.hooks import Trace  # noqa: E402
from .models.loading import LoadedModel, load, wrap  # noqa: E402

__all__ = ["LoadedModel", "Report", "Trace", "__version__", "load", "scan", "wrap"]
