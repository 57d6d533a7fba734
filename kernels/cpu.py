"""The CPU kernels (cpu_attention.c, cpu_ops.c): built once with the system C compiler, loaded with ctypes.

`paged_attention` and `reshape_and_cache` have the arguments and results of their reference.py versions, for
float32 and bfloat16 (`supports`), except for the key cache's layout: [num_blocks, num_kv_heads, head_dim,
block_size] (`key_cache_shape`), K transposed within a block, so that the attention kernel computes a block's
scores with plain vector multiply-adds (cpu_attention.c). The value cache keeps the reference's layout.
`rms_norm` (with or without the residual add) and `rotary` are the C versions of layers/fused.py's ops, for
tensors that `fits()`; layers/fused.py picks between them and torch. Without a C compiler (one warning), the
engine runs the pure-torch reference instead (layers/attention.py).

The build is cached under $BATCHLLM_HOME/kernels (default ~/.cache/batchllm/kernels), keyed by the sources,
the compiler and this CPU's flags; `-march=native` makes it this machine's code. BATCHLLM_CPU_KERNELS=0 turns
the kernels off.
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

_SOURCES = [Path(__file__).with_name(n) for n in ("cpu_attention.c", "cpu_ops.c")]
_HEADERS = [Path(__file__).with_name("cpu_common.h")]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_HIDDEN = 16384  # rms_norm's widest row (MAX_HIDDEN in cpu_ops.c)
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
    texts = [p.read_text() for p in _SOURCES + _HEADERS]
    key = hashlib.sha256("\0".join([*texts, cc, version, *flags, _cpu_flags()]).encode()).hexdigest()
    target = _cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        res = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", str(out), "-lm"], capture_output=True,
                             text=True)
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
            lib.rms_norm.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, ctypes.c_float, _i32]
            lib.rotary.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32]
            lib.reshape_and_cache.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32,
                                              _i32]
            for fn in (lib.rms_norm, lib.rotary, lib.reshape_and_cache):
                fn.restype = None
            _lib = lib
        except (OSError, RuntimeError) as e:
            warnings.warn(f"CPU kernels unavailable ({e}); using the pure-torch reference (slower)")
            _lib = False
    return _lib or None


def supports(dtype: torch.dtype) -> bool:
    """Whether the C attention and cache write run this dtype (on this machine)."""
    return dtype in _DTYPES and load() is not None


def key_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
    return (num_blocks, num_kv_heads, head_dim, block_size)


def _check_caches(key_cache, value_cache, dtype):
    nb, bs, kvh, d = value_cache.shape
    if (not supports(dtype) or key_cache.dtype != dtype or value_cache.dtype != dtype
            or tuple(key_cache.shape) != key_cache_shape(nb, bs, kvh, d) or d > 256
            or not (key_cache.is_contiguous() and value_cache.is_contiguous())):
        raise ValueError(f"CPU kernels take contiguous float32/bfloat16 caches, K as {key_cache_shape(nb, bs, kvh, d)}"
                         f"; got K {tuple(key_cache.shape)} {key_cache.dtype}, V {tuple(value_cache.shape)}")


def paged_attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale=None, out=None):
    """Causal paged attention of each sequence's new query rows (see reference.paged_attention); K in this
    module's layout."""
    _check_caches(key_cache, value_cache, query.dtype)
    num_tokens, num_heads, head_dim = query.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    scale = head_dim**-0.5 if scale is None else scale
    if out is None or not out.is_contiguous():
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype)
    qsl = query_start_loc.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous()
    rc = _lib.paged_attention(query.data_ptr(), query.stride(0), query.stride(1), key_cache.data_ptr(),
                              value_cache.data_ptr(), qsl.data_ptr(), lens.data_ptr(), table.data_ptr(),
                              table.stride(0), lens.numel(), num_heads, value_cache.shape[2], head_dim,
                              value_cache.shape[1], scale, _DTYPES[query.dtype], out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"CPU attention kernel failed ({rc}): heads {num_heads}/{value_cache.shape[2]}, "
                           f"head_dim {head_dim}")
    return out


def fits(*tensors) -> bool:
    """Whether the C ops take these tensors: CPU, one dtype (float32 or bfloat16), last dim contiguous."""
    t0 = tensors[0]
    return (load() is not None and t0.dtype in _DTYPES and all(
        t.device.type == "cpu" and t.dtype == t0.dtype and t.stride(-1) == 1 for t in tensors))


def rms_norm(x, weight, eps: float, residual=None):
    """x, residual: [rows, hidden] (row-strided) -> out, or (out, x + residual) with a residual."""
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype)
    res_out = None if residual is None else torch.empty_like(out)
    _lib.rms_norm(x.data_ptr(), x.stride(0), 0 if residual is None else residual.data_ptr(),
                  0 if residual is None else residual.stride(0), weight.data_ptr(), out.data_ptr(),
                  0 if res_out is None else res_out.data_ptr(), rows, hidden, eps, _DTYPES[x.dtype])
    return out if residual is None else (out, res_out)


def rotary(x, cos, sin):
    """x: [rows, heads, head_dim] (heads contiguous in a row); cos, sin: [rows, 1, head_dim] contiguous."""
    rows, heads, d = x.shape
    out = torch.empty((rows, heads, d), dtype=x.dtype)
    _lib.rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, heads, d,
                _DTYPES[x.dtype])
    return out


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """As reference.reshape_and_cache, K in this module's layout: key, value [tokens, kv_heads, head_dim] into the
    caches' slots, -1 skipped."""
    _check_caches(key_cache, value_cache, key.dtype)
    if key.stride(-1) != 1 or key.stride(1) != key.shape[2]:
        key = key.contiguous()
    if value.stride(-1) != 1 or value.stride(1) != value.shape[2]:
        value = value.contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    tokens, kv_heads, d = key.shape
    _lib.reshape_and_cache(key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), key_cache.data_ptr(),
                           value_cache.data_ptr(), slots.data_ptr(), tokens, kv_heads, d, value_cache.shape[1],
                           _DTYPES[key.dtype])
