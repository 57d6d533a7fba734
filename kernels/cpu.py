"""The CPU attention kernel (cpu_attention.c): built once with the system C compiler, loaded with ctypes.

`paged_attention` has the arguments and result of `reference.paged_attention`. It runs the C kernel for
float32 and bfloat16 and falls back to the reference for other dtypes, or when no compiler is found (one
warning). The build is cached under $BATCHLLM_HOME/kernels (default ~/.cache/batchllm/kernels), keyed by
the source, the compiler and this CPU's flags; `-march=native` makes it this machine's code. BATCHLLM_CPU_KERNELS=0
turns the kernel off.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from batchllm.kernels import reference

_SOURCE = Path(__file__).with_name("cpu_attention.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lib = None  # ctypes.CDLL, False once building failed
_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def _cache_dir() -> Path:
    env = os.environ.get("BATCHLLM_HOME")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "batchllm") / "kernels"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, *flags, _cpu_flags()]).encode()).hexdigest()
    target = _cache_dir() / f"cpu_attention-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        res = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent workers see the whole file or none
    return target


def load():
    """-> the ctypes library, or None where it cannot be built (warned once)."""
    global _lib
    if _lib is None:
        if os.environ.get("BATCHLLM_CPU_KERNELS", "1") == "0":
            _lib = False
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
            lib.paged_attention.restype = _i32
            lib.paged_attention.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64,
                                            _i32, _i32, _i32, _i32, _i32, ctypes.c_float, _i32, _ptr]
            _lib = lib
        except (OSError, RuntimeError) as e:
            warnings.warn(f"CPU attention kernel unavailable ({e}); using the pure-torch reference (slower)")
            _lib = False
    return _lib or None


def paged_attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale=None, out=None):
    """Causal paged attention of each sequence's new query rows (see reference.paged_attention)."""
    lib = load()
    dtype = _DTYPES.get(query.dtype)
    num_tokens, num_heads, head_dim = query.shape
    if (lib is None or dtype is None or key_cache.dtype != query.dtype or query.device.type != "cpu"
            or head_dim > 256 or num_heads // key_cache.shape[2] > 16
            or query.stride(2) != 1 or not (key_cache.is_contiguous() and value_cache.is_contiguous())):
        return reference.paged_attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table,
                                         scale=scale, out=out)
    scale = head_dim**-0.5 if scale is None else scale
    if out is None or not out.is_contiguous():
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype)
    qsl = query_start_loc.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous()
    rc = lib.paged_attention(query.data_ptr(), query.stride(0), query.stride(1), key_cache.data_ptr(),
                             value_cache.data_ptr(), qsl.data_ptr(), lens.data_ptr(), table.data_ptr(),
                             table.stride(0), lens.numel(), num_heads, key_cache.shape[2], head_dim,
                             key_cache.shape[1], scale, dtype, out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"CPU attention kernel failed ({rc}): heads {num_heads}/{key_cache.shape[2]}, "
                           f"head_dim {head_dim}")
    return out
