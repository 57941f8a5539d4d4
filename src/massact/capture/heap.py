"""Freed memory reused instead of handed back: the verification's passes each make logits of a few hundred MB
(positions x vocabulary), and glibc serves every allocation that large with a fresh mmap, whose pages the kernel
faults in and zeroes one by one. On the default model that page faulting took a fifth of the full report's time
(about 10 s of system time). Within ``reused_heap`` large blocks come from the heap, where a freed one serves the next
of its size."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_MMAP_MAX = 65536
# glibc raises its mmap threshold by itself, up to 32 MiB (and the trim threshold to twice that), once large blocks
# have been freed; setting either by mallopt ends that, so afterwards both are set where it would have taken them.
SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: up to 2 GiB of free heap top is kept


def _glibc():
    """The C library when it is glibc (the one with mallopt and malloc_trim), else None (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_heap() -> Iterator[None]:
    """Within the block, no allocation is served by mmap and the heap is not trimmed, so a freed block serves the
    next; afterwards large blocks are mmapped again and the heap's free top goes back to the system. Nothing
    changes where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
