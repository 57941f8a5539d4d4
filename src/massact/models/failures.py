"""When the model's own code fails: which block, and which of its modules raised, said in one line.

A config that transformers builds can still describe a model whose forward pass fails (more experts per token than
experts, grouped key-value heads on MLA attention, a chunk size of 0). That is bad input, not a fault of massact's:
``guard`` turns such an error into a ``ModelCodeError`` (a ``UsageError``, so the command line prints one line and
exits with code 2) and leaves every other error as it was. An error is the model's own when the innermost frame of
its traceback that is neither torch's nor a plain function of the model's library is a method of one of the
model's modules; a frame of massact's own code found first makes it massact's (a bug, shown whole)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from torch import nn

from ..errors import UsageError

_PACKAGE = str(Path(__file__).resolve().parents[1])  # massact's own source folder
_BLOCKS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # each loaded model's blocks -> index


class ModelCodeError(UsageError):
    """The model's own code raised while massact ran it (a config transformers accepts but cannot run)."""


def register_blocks(blocks: nn.ModuleList) -> None:
    """Remember each block's index, so that a failure inside one is said to be at that block."""
    for index, block in enumerate(blocks):
        _BLOCKS[block] = index


def _frames(traceback: TracebackType | None) -> list:
    """The traceback's frames, outermost first."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return frames


def _module_of(frame) -> nn.Module | None:
    """The module whose method this frame runs (its ``self``), if any."""
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, nn.Module) else None


def _library(module: nn.Module) -> str:
    """Where a module's class is defined, as the message names it: "transformers'" or the model's own package."""
    top = type(module).__module__.split(".")[0]
    return "the model's own" if top.startswith("transformers_modules") else f"{top}'"


def describe(error: BaseException) -> str | None:
    """One line saying where the model's own code failed, or None when the error is not the model's (raised in
    massact's own code, or outside any module of a model)."""
    frames = _frames(error.__traceback__)
    failing = None
    for depth in range(len(frames) - 1, -1, -1):  # innermost first
        frame = frames[depth]
        if frame.f_code.co_filename.startswith(_PACKAGE):
            return None
        module = _module_of(frame)
        if module is not None and not type(module).__module__.startswith("torch."):
            failing = depth
            break
    if failing is None:
        return None
    module = _module_of(frames[failing])
    layer = next((_BLOCKS[owner] for frame in reversed(frames[: failing + 1])
                  if (owner := _module_of(frame)) is not None and owner in _BLOCKS), None)
    where = "" if layer is None else f" at block {layer}"
    text = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return f"the model's own forward pass failed{where} ({_library(module)} {type(module).__name__}): {message}"


@contextmanager
def guard() -> Iterator[None]:
    """Run the model: an error of the model's own code becomes a one-line ``ModelCodeError``; any other passes."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:
        message = describe(error)
        if message is None:
            raise
        raise ModelCodeError(message) from error


F = TypeVar("F", bound=Callable)


def guarded(function: F) -> F:
    """``function`` run under ``guard``."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with guard():
            return function(*args, **kwargs)

    return run  # type: ignore[return-value]
