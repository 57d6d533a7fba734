"""Host memory: glibc malloc settings for the CPU engine, and page-locked staging for copies to the GPU.

`to_device` stages a step's host arrays in page-locked memory, and `to_host` copies a result back into it.
A copy from pageable memory can wait for the stream to drain (the driver stages it itself; a blocking one
always does), which would stall asynchronous scheduling: the next step's launch would wait for the running
one. torch's caching host allocator keeps each staging block until its copy has run, so a block is never
overwritten early.

glibc:
A prefill step allocates activations of several MB per op ([2048, 3072] bf16 is 12 MB). glibc serves blocks that
large with fresh mmap()s and unmaps them on free, so every step page-faults its activations in again: measured
at 15-25% of a prefill step on the 2-core dev box (docs/benchmarks.md). Raising the mmap threshold to its
maximum (32 MB) and keeping freed memory at the heap's top makes later steps reuse the same pages. The cost is
a heap that does not shrink while the worker runs, which suits a batch worker. No-op off glibc.
"""
import ctypes
import ctypes.util
import platform

import numpy as np
import torch

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


def pinned(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A page-locked copy of a (as dtype), to copy to the GPU with non_blocking=True."""
    src = torch.from_numpy(a)
    return torch.empty(src.shape, dtype=dtype or src.dtype, pin_memory=True).copy_(src)


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """a as a tensor of dtype on device; for CUDA through a page-locked copy, so the transfer is asynchronous."""
    if device.type != "cuda":
        src = torch.from_numpy(a)
        return src.to(dtype=dtype or src.dtype)
    return pinned(a, dtype).to(device, non_blocking=True)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A page-locked host copy of the GPU tensor x, filled behind the work queued so far (wait on an event)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host
