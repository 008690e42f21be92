"""Keep freed memory in the process for reuse.

glibc's malloc hands large blocks (from 128 KiB, rising with use up to 32 MiB) straight to the
operating system when they are freed, and shrinks the heap whenever its free top grows past a
threshold. A training step at a large batch frees and allocates the same tensors (megabytes each)
every step, so each allocation came back page by page, zero-filled by the kernel: at batch 8192
that was a large part of a step. `keep_freed_memory` raises both thresholds so freed blocks stay
in the heap for the next step; memory use stays near its peak instead of shrinking between steps.
The `handgrad` command calls it at start; importing handgrad changes nothing.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the heap's top


_kept = False  # whether this process has set them


def keep_freed_memory() -> bool:
    """Set the thresholds where the C library is glibc; True if it took effect."""
    global _kept
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl, ...): leave it as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept


def keeps_freed_memory() -> bool:
    """Whether `keep_freed_memory` took effect in this process (the `handgrad` command calls it)."""
    return _kept
