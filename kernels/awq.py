"""AWQ matmul in Triton: x [M, K] (fp16 / bf16 / fp32) @ a 4-bit weight, dequantized tile by tile in registers.

The weight is AWQ's GEMM layout (reference.awq_dequantize): qweight [K, N/8] int32, qzeros [K/G, N/8] int32,
scales [K/G, N]. A program computes a BLOCK_M x BLOCK_N tile of the output; per BLOCK_K slice of K it loads the
packed words of its columns (BLOCK_N / 8 a row), shifts the 8 nibbles of each out, subtracts the group's zero,
multiplies by the group's scale (fp32, then x's dtype: one rounding, as a dequantized weight would have) and runs
the tile's dot product with fp32 accumulation. BLOCK_K divides G, so a slice has one group.

Small M reads the weight once and does little arithmetic on it: too few output tiles to fill the SMs, so K is
split (SPLIT_K programs per tile, each summing a contiguous run of slices into an fp32 partial; the partials are
added after). `config(m, n, k, group)` picks the tiles. Large M is better served by `awq_dequantize` and cuBLAS:
`awq_matmul` chooses.
"""
import torch
import triton
import triton.language as tl

from batchllm.kernels.attention_config import device_limits


@triton.jit
def _unpack(words):
    """[R, C] int32 AWQ words -> [R, 8 C] int32 nibbles, column 8 c + j of the result from bits 4 * [0, 4, 1, 5, 2,
    6, 3, 7][j] of word c."""
    j = tl.arange(0, 8)
    shifts = ((j // 2) + (j % 2) * 4) * 4
    return tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_qz, stride_s,
                     stride_os, stride_om, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # each packed word holds 8 columns
    m_ok, n_ok, w_ok = offs_m < M, offs_n < N, words < N // 8
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per_split = tl.cdiv(K // BLOCK_K, SPLIT_K)  # a contiguous run of K slices per program: a loop that pipelines
    for kt in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, K // BLOCK_K)):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        qw = tl.load(qw_ptr + offs_k.to(tl.int64)[:, None] * stride_qw + words[None, :], mask=w_ok[None, :], other=0)
        g = (kt * BLOCK_K) // GROUP
        qz = tl.load(qz_ptr + g * stride_qz + words, mask=w_ok, other=0)
        s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        w = ((_unpack(qw) - _unpack(qz[None, :])).to(tl.float32) * s[None, :]).to(x.dtype)
        acc += tl.dot(x, w, out_dtype=tl.float32, input_precision="ieee")  # fp32 inputs: no tf32
    out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _awq_dequantize_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, stride_qw, stride_qz, stride_s, stride_w,
                           GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    n_ok, w_ok = offs_n < N, words < N // 8
    qw = tl.load(qw_ptr + offs_k.to(tl.int64)[:, None] * stride_qw + words[None, :], mask=w_ok[None, :], other=0)
    g = (pid_k * BLOCK_K) // GROUP
    qz = tl.load(qz_ptr + g * stride_qz + words, mask=w_ok, other=0)
    s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    w = ((_unpack(qw) - _unpack(qz[None, :])).to(tl.float32) * s[None, :]).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_k.to(tl.int64)[:, None] * stride_w + offs_n[None, :], w, mask=n_ok[None, :])


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The AWQ weight as a dense W [K, N] (x @ W), in `dtype` (default: the scales' dtype), written into the
    start of `out` (a flat buffer of that dtype) if given."""
    k, n = qweight.shape[0], scales.shape[1]
    group = k // scales.shape[0]
    block_k = min(group, 32)
    if group % block_k:
        raise ValueError(f"awq_dequantize: group size {group} is not a power of 2")
    dtype = dtype or scales.dtype
    w = out[: k * n].view(k, n) if out is not None else torch.empty((k, n), dtype=dtype, device=qweight.device)
    if w.dtype != dtype:
        raise ValueError(f"awq_dequantize: out is {w.dtype}, not {dtype}")
    grid = (k // block_k, triton.cdiv(n, 128))
    _awq_dequantize_kernel[grid](qweight, qzeros, scales, w, n, qweight.stride(0), qzeros.stride(0),
                                 scales.stride(0), w.stride(0), GROUP=group, BLOCK_K=block_k, BLOCK_N=128,
                                 num_warps=4)
    return w


def config(m: int, n: int, k: int, group: int, sms: int = 132) -> dict:
    """Tile sizes and K split for an [m, k] x [k, n] AWQ matmul on a card of `sms` SMs: the tiles that measured
    fastest on llama3-8b's shapes (tests/gpu/awq_bench.py, H100), K split for about 4 programs an SM up to 64 rows
    and 2 above (at 128 rows 4 took 0.367 ms a layer against 2's 0.291: docs/benchmarks.md T78, T79)."""
    if m <= 16:
        c = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    elif m <= 32:
        c = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    elif m <= 64:
        c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        c = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    c["BLOCK_K"] = min(c["BLOCK_K"], group)
    tiles = max(1, -(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]))
    c["SPLIT_K"] = max(1, min(k // c["BLOCK_K"], 16, ((4 if m <= 64 else 2) * sms) // tiles))
    return c


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             cfg: dict | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ the AWQ weight -> [M, N] in x's dtype. cfg: config()'s keys, to override."""
    m, k = x.shape
    n = scales.shape[1]
    group = k // scales.shape[0]
    if x.stride(-1) != 1 or qweight.shape != (k, n // 8) or qzeros.shape != (k // group, n // 8) or k % group:
        raise ValueError(f"awq_gemm: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not fit together")
    if cfg is None:
        index = (x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else None
        cfg = config(m, n, k, group, device_limits(index)[0])
    c = dict(cfg)
    split = c.pop("SPLIT_K")
    if group % c["BLOCK_K"]:
        raise ValueError(f"awq_gemm: BLOCK_K {c['BLOCK_K']} must divide the group size {group}")
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"]), split)
        _awq_gemm_kernel[grid](x, qweight, qzeros, scales, out, m, n, k, x.stride(0), qweight.stride(0),
                               qzeros.stride(0), scales.stride(0), out.stride(0), out.stride(1), GROUP=group,
                               SPLIT_K=split, **c)
    return out.sum(0).to(x.dtype) if split > 1 else out[0]


DEQUANTIZE_FROM_M = 192  # from here, dequantize and let cuBLAS multiply: the fused kernel measured faster at 128
# rows, the dequantized weight at 256 (docs/benchmarks.md, T76)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ the AWQ weight -> [M, N] in x's dtype: the fused kernel for few rows, where the weight's bytes
    decide; for many, the weight dequantized once (a quarter of its bf16 bytes read, all of them written; into
    `scratch` if given) and cuBLAS's matmul, which the fused kernel's tensor-core use does not match."""
    if x.shape[0] >= DEQUANTIZE_FROM_M:
        return x @ awq_dequantize(qweight, qzeros, scales, x.dtype, out=scratch)
    return awq_gemm(x, qweight, qzeros, scales)

