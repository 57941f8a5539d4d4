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


def _refuse(path: Path, why: str) -> UsageError:
    return UsageError(f"cannot read the scan state {path}: {why}; remove it or drop --resume")


def read_state(path: Path) -> dict:
    """The saved state at ``path``, checked to have the structure ``_save_state`` writes: done (int >= 0), fingerprint
    and identity (str), counts (one 1-D float64 tensor per block) and tops (per block None or (values [n] float,
    labels [n, 3] int64)). torch.load runs with weights_only=True: a pickle that would run code is refused."""
    try:
        if path.stat().st_size == 0:
            raise _refuse(path, "the file is empty")
        with warnings.catch_warnings():  # e.g. on a plain pickle's protocol: more lines on stderr, saying nothing
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except UsageError:
        raise
    except Exception as error:  # torch's message is several lines and may advise unsafe loading: not relayed
        raise _refuse(path, f"not a scan state written by massact ({type(error).__name__})") from None
    problem = _structure_problem(state)
    if problem:
        raise _refuse(path, problem)
    return state


def _structure_problem(state) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a scan state"
    for key, kind in (("done", int), ("fingerprint", str), ("identity", str), ("counts", list), ("tops", list)):
        if key not in state:
            return f"no {key!r} in it"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    if state["done"] < 0:
        return "'done' is negative"
    if len(state["tops"]) != len(state["counts"]):
        return "'counts' and 'tops' have different lengths"
    for block, counts in enumerate(state["counts"]):
        if not isinstance(counts, torch.Tensor) or counts.dtype != torch.float64 or counts.dim() != 1:
            return f"counts[{block}] is not a 1-D float64 tensor"
    for block, top in enumerate(state["tops"]):
        if top is None:
            continue
        if not (isinstance(top, (tuple, list)) and len(top) == 2 and all(isinstance(t, torch.Tensor) for t in top)):
            return f"tops[{block}] is not a pair of tensors"
        values, labels = top
        if values.dim() != 1 or not values.is_floating_point() or labels.dtype != torch.int64 \
                or tuple(labels.shape) != (len(values), 3):
            return f"tops[{block}] is not values [n] and labels [n, 3]"
    return None


def shape_problem(state: dict, n_layers: int, bins: int, k: int) -> str | None:
    """Why a well-formed state cannot belong to a scan of ``n_layers`` blocks, ``bins`` histogram bins and top-``k``
    lists (None when it can)."""
    if len(state["counts"]) != n_layers:
        return f"it has {len(state['counts'])} blocks, the model {n_layers}"
    for block, (counts, top) in enumerate(zip(state["counts"], state["tops"])):
        if len(counts) != bins:
            return f"counts[{block}] has {len(counts)} bins, not {bins}"
        if top is not None and len(top[0]) > k:
            return f"tops[{block}] holds {len(top[0])} entries, more than {k}"
    return None


def remove_partial(path: Path) -> None:
    """Remove a half-written file (e.g. after a full disk), ignoring that it may not exist."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
