"""Giving a long-lived process's freed memory back to the machine. The pipeline's driver lives through every stage
and runs some in-process (production, evaluation; a user's own flows may run more): glibc keeps freed blocks of a
Python heap for reuse (measured when the driver still pretrained the toy backbone itself: 2.1 GB held after it,
1.0 GB once trimmed), so the machine's peak would count memory nobody uses. The stages that train models run in
processes of their own (i2l.cluster.child, Ray Train), which return everything when they end."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Free what only reference cycles still hold, hand Arrow's pool its unused blocks back, then return the heap's
    free pages to the OS (glibc's malloc_trim). False where the C library has no such call (macOS, musl): nothing
    to trim there, nothing lost."""
    gc.collect()  # cycles (autograd graphs, progress bars, frames of a finished stage) are only freed by the GC
    arrow = sys.modules.get("pyarrow")  # only if a stage used it: importing it here would cost memory
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def rss_mb() -> float | None:
    """This process's resident set (MB) from /proc, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
