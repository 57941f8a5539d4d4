"""Masks of the positions that carry massive activations, for SAE, probing and steering code:
``live(hidden, criterion)`` from a hidden state, ``Hook`` during any forward pass, and ``Profile.mask`` (from
``massact.profile``) from token ids alone."""

from .capture.masks import Hook, live
from .settings import Criterion

__all__ = ["Criterion", "Hook", "live"]
