"""Giving memory the engine no longer uses back to the operating system.

The engine allocates and frees many large tensors of ever-changing sizes: a prefill's
activations (tens of MB each for a batch of long prompts), the batch's KV cache rebuilt
whenever a row joins or leaves. glibc's malloc keeps what is freed for later instead of
returning it: its mmap threshold rises to the size of the largest block freed so far (up to
32 MB), so after the first large free almost every tensor comes from the heaps, and freed
memory in the middle of a heap is never returned on its own. Under 16 streaming clients the
server's resident memory went from 440 MB to over 2 GB this way, of which about 1.5 GB was
free memory malloc held (``malloc_trim(0)`` brought it back to 640 MB), and it stayed there
when the server went idle. MALLOC_ARENA_MAX does not help: one arena fragments the same way.

Two remedies, glibc only (elsewhere nothing happens):

- ``return_large_blocks_at_once``: the mmap threshold is fixed at ``LARGE_BLOCK_BYTES``, so
  every block from 128 KB up (glibc's own starting threshold, which it would otherwise raise)
  gets pages of its own that go back to the system the moment it is freed, instead of a hole
  in a heap. Figures in docs/RELIABILITY.md. The price is a page
  fault per 4 KB the first time such a tensor is written, small beside the work on it. An
  operator who sets glibc's own MALLOC_MMAP_THRESHOLD_ keeps that value.
- ``malloc_trim(0)`` for what still collects in the heaps: the engine calls it when its batch
  empties, and while it is busy at most once every ``interval`` seconds. A trim takes a few
  tens of milliseconds when there is much to release, and runs without the interpreter lock
  (ctypes releases it), so the server's other threads go on meanwhile.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


LARGE_BLOCK_BYTES = 128 << 10  # from this size up, malloc maps pages of their own
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache  # every engine asks (return_large_blocks_at_once); look it up once
def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (not macOS, Windows or musl)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def return_large_blocks_at_once() -> bool:
    """Fix glibc's mmap threshold at ``LARGE_BLOCK_BYTES`` for this process (see the module
    docstring). False, and nothing changed, without glibc or when MALLOC_MMAP_THRESHOLD_ is
    set (the operator's value stands)."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(LARGE_BLOCK_BYTES)))


def release_free_memory() -> bool:
    """Return the memory malloc holds but nobody uses to the system; False where this
    platform has no way to (then nothing happens)."""
    if _MALLOC_TRIM is None:
        return False
    try:
        _MALLOC_TRIM(0)
    except Exception:  # never let housekeeping fail a step
        logger.debug("malloc_trim failed", exc_info=True)
        return False
    return True


class MemoryReleaser:
    """Decides when the engine releases free memory: when the batch empties after work, and
    while busy at most once every ``interval`` seconds (0: only when it empties)."""

    def __init__(
        self,
        interval: float = 5.0,
        release: Callable[[], bool] = release_free_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._release = release
        self._clock = clock
        self._last = clock()
        self._worked = False  # rounds ran since the last release
        self.releases = 0

    def after_round(self, busy: bool) -> None:
        """Called after each round of the engine's loop; ``busy``: a batch is still running."""
        if busy:
            self._worked = True
            if not self.interval or self._clock() - self._last < self.interval:
                return
        elif not self._worked:
            return
        self._worked = False
        self._last = self._clock()
        if self._release():
            self.releases += 1
