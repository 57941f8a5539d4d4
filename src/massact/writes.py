"""A file or a folder written whole or not at all, for every layer that writes one: the report's files, the scan's
state, the converted GGUF cache. A reader, or a kill at any moment, finds the previous one or the new one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_whole(path: Path, write: Callable[[Path], None], partial: Path | None = None) -> None:
    """``write`` fills ``partial`` (default: a hidden name beside ``path``, with this process's id), which then
    replaces ``path`` in one rename. On any error, a full disk or Ctrl-C included, the partial is removed and the
    error raised: nothing half-written stays."""
    partial = partial or path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        remove(partial)  # after the rename there is none


def remove(path: Path) -> None:
    """Remove a file or a folder if it is there, ignoring what cannot be removed (a read-only place)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
