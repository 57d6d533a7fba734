"""glibc malloc settings for the CPU engine.

A prefill step allocates activations of several MB per op ([2048, 3072] bf16 is 12 MB). glibc serves blocks that
large with fresh mmap()s and unmaps them on free, so every step page-faults its activations in again: measured
at 15-25% of a prefill step on the 2-core dev box (docs/benchmarks.md). Raising the mmap threshold to its
maximum (32 MB) and keeping freed memory at the heap's top makes later steps reuse the same pages. The cost is
a heap that does not shrink while the worker runs, which suits a batch worker. No-op off glibc.
"""
import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; -> whether they took."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
              and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1)
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
