"""Resuming a scan: what makes two scans the same scan, and a checked read of a saved scan state.

A state is resumed only by the scan that wrote it: same model (name, class, and ``models.identity``'s weights),
dtype, device type and settings; the token ids it covers are checked separately, as they are read again. Anything
else in the file is refused in one line, never with the loader's own message.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from ...errors import UsageError
from ...models.identity import weights_sha256
from ...models.loading import LoadedModel


def scan_identity(lm: LoadedModel, **settings) -> str:
    """sha256 of what a scan's statistics depend on besides its texts: the model's name and class, its weights
    (``weights_sha256``: every parameter's name, shape, dtype and sampled bytes), the device type, and ``settings``
    (top-k, thresholds, max-length, batch size)."""
    digest = hashlib.sha256(f"{lm.name}|{type(lm.model).__name__}|{lm.dtype}|{lm.device.type}|".encode())
    for key in sorted(settings):
        digest.update(f"{key}={settings[key]!r}|".encode())
    digest.update(weights_sha256(lm.model).encode())
    return digest.hexdigest()


def state_refused(path: Path, why: str) -> UsageError:
    """The one line that refuses the scan state at ``path``, saying ``why``."""
    return UsageError(f"cannot read the scan state {path}: {why}; remove it or drop --resume")


def read_state(path: Path) -> dict:
    """The saved state at ``path``, checked to have the structure ``save_state`` writes: done (int >= 0), fingerprint
    and identity (str), blocks (a dict: the recorder's ``state_dict()``) and experts (a dict, the experts' maxima's,
    or None). What the statistics hold is checked by their ``load_state_dict``. torch.load runs with
    weights_only=True: a pickle that would run code is refused."""
    try:
        if path.stat().st_size == 0:
            raise state_refused(path, "the file is empty")
        with warnings.catch_warnings():  # e.g. on a plain pickle's protocol: more lines on stderr, saying nothing
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except UsageError:
        raise
    except Exception as error:  # torch's message is several lines and may advise unsafe loading: not relayed
        raise state_refused(path, f"not a scan state written by massact ({type(error).__name__})") from None
    problem = _structure_problem(state)
    if problem:
        raise state_refused(path, problem)
    return state


def _structure_problem(state) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a scan state"
    for key, kind in (("done", int), ("fingerprint", str), ("identity", str), ("blocks", dict), ("experts", (dict, type(None)))):
        if key not in state:
            return f"no {key!r} in it"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            return f"{key!r} is a {type(state[key]).__name__}, not a {names}"
    if state["done"] < 0:
        return "'done' is negative"
    return None
