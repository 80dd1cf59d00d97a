"""glibc's malloc on the CPU: keep the memory PyTorch frees for its next tensors, and give it back."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

OFF_WORDS = ("0", "false", "no", "off")  # what a MULTIDIFF_* switch in the environment reads as off


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: glibc never trims the heap by itself (mallopt(3))
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory PyTorch frees on the CPU for its next tensors.

    By default glibc serves large blocks (over a threshold that starts at 128 KiB and adapts up to 32
    MiB: most of a UNet's activations at 512 px) with fresh mappings from the kernel, unmaps them when
    freed and trims the heap as it empties, so every UNet call faults its activations in again, page
    by page, zeroed by the kernel (README, *Freed memory on the CPU*: 13% of a panorama's UNet time,
    SD2, 2 cores). What it frees stays with the process until `release_freed_memory`. Off with
    MULTIDIFF_KEEP_FREED_MEMORY=0; left alone where the user set the same settings (MALLOC_MMAP_MAX_,
    MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or their GLIBC_TUNABLES) or
    preloads another allocator, and off glibc. Returns whether it applied."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = (
        os.environ.get("MULTIDIFF_KEEP_FREED_MEMORY", "1").strip().lower() in OFF_WORDS
        or any(name in os.environ for name in USER_MALLOC_VARIABLES)
        or any(f"glibc.malloc.{name}" in tunables for name in ("mmap_max", "mmap_threshold", "trim_threshold", "top_pad"))
        or "malloc" in os.environ.get("LD_PRELOAD", "")
    )
    libc = None if chosen else _glibc()
    return libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1


def release_freed_memory() -> None:
    """Give the memory `keep_freed_memory` kept back to the system (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (Linux), with mallopt and malloc_trim; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc
