"""Allocator tuning for the update attempt process (glibc only; a no-op elsewhere).

A transfer allocates a fresh buffer per network chunk and per tar read. Above glibc's
mmap threshold each such buffer is its own mmap, whose pages the kernel faults in and
zeroes and then unmaps again: on a 512 MiB bundle that was more system time than all the
hashing. Raising the threshold (and the trim threshold with it) keeps those buffers in the
heap, where they are reused. At most ``trim_threshold`` of freed heap is kept, so the
peak grows by a few MiB at most (the attempt process is short-lived anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 4 << 20, trim_threshold: int = 16 << 20) -> bool:
    """Keep buffers up to ``mmap_threshold`` bytes in the heap; True when applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    logger.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
