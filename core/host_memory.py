"""Keep freed host memory in the process, so a CPU training step does not fault in fresh pages.

A training step allocates and frees the same large temporaries every time (activations, logits,
gradients). glibc's ``malloc`` returns blocks above its mmap threshold (128 KiB at first, adapting
up to 32 MiB) to the kernel when they are freed, so the next step maps them again and the kernel
zeroes every page: on the 2-core development VM about a fifth of a CPU step of the benchmark's BERT
went to system time. Raising the mmap and trim thresholds keeps those blocks in the heap for reuse
(the process' resident memory stays at its peak instead of shrinking between steps). No-op where the
C library is not glibc. ``benchmarks/throughput.py`` measures the step with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["GLIBC_STEADY_STATE", "retain_freed_memory", "set_malloc_thresholds"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_RETAIN = 1 << 30  # bytes: blocks up to 1 GiB are reused, never unmapped
# where glibc's own adjustment of the thresholds ends on 64-bit Linux (mmap 32 MiB, trim twice that): what a
# long-running process without this setting has (benchmarks/throughput.py runs the stock contenders so)
GLIBC_STEADY_STATE = (32 << 20, 64 << 20)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds for this process; ``False`` where the C library has no ``mallopt``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this process; ``True`` if it is in effect."""
    return set_malloc_thresholds(_RETAIN, _RETAIN)
