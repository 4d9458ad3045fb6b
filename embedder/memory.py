"""Hands freed heap memory back to the OS, so a long run's resident memory stays flat.

glibc's malloc keeps memory that the program freed inside its arenas, to reuse it. The runner's
threads free blocks of many sizes in an interleaved pattern (CPU activations of varying batch
shapes in the encoder thread, unpickled chunk blocks in the packer thread, row tables in the
committer), and the arenas fragment: over a 30M-token CPU run the memory *in use* stayed at
~230 MB while the free memory held inside the arenas grew 103 → 170 MB, and the runner's RSS with
it. ``malloc_trim(0)`` returns every free page of every arena to the kernel (``madvise``), which
keeps RSS flat; it took 10–20 ms per call with ~400 MB of arenas.

Linux with glibc only; elsewhere (macOS, Windows, musl) ``trim_heap`` does nothing and returns
False. Needs no environment variable set by the user.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time
from collections.abc import Callable


@functools.cache
def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim  # glibc only: musl has no libc.so.6 / malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Returns the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``).

    Returns:
        True where it ran (Linux/glibc), False where the platform has no such call.
    """
    fn = _load_malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


class HeapTrimmer:
    """Calls ``trim_heap`` at most once per ``min_interval_s`` (the runner calls it after each shard
    commit: small shards committing many times a second should not pay 10–20 ms each time).

    Called from one thread (the runner's committer); ``seconds`` and ``calls`` say what trimming
    cost over the run.

    Args:
        min_interval_s: Least time between two trims.

    Example:
        >>> trimmer = HeapTrimmer()
        >>> trimmer.maybe_trim()  # after a shard's rows are written and freed
    """

    def __init__(self, min_interval_s: float = 2.0) -> None:
        self.min_interval_s = min_interval_s
        self.seconds = 0.0
        self.calls = 0
        self._last = float("-inf")
        self.available = _load_malloc_trim() is not None

    def maybe_trim(self) -> None:
        """Trims unless the last trim was less than ``min_interval_s`` ago (or trimming is unavailable)."""
        now = time.monotonic()
        if not self.available or now - self._last < self.min_interval_s:
            return
        self._last = now
        trim_heap()
        self.seconds += time.monotonic() - now
        self.calls += 1
