"""FP8 (e4m3) in Triton: rounding that Triton's interpreter gets right, and per-row (per-token) quantization.

`round_to_e4m3` rounds fp32 to the nearest float8_e4m3fn value (ties to even) and saturates at +-448, still in
fp32, so the cast that follows is exact. Triton's interpreter rounds fp8 casts wrongly (to the lower binade when
rounding carries into the next one); doing it here keeps one code path for the interpreter and the GPU.

`quantize_rows(x)`: x [M, K] -> (x_q [M, K] float8_e4m3fn, scale [M] fp32) with x ~= x_q * scale per row, the
scale the smallest power of 2 with max|row| <= 448 * scale (reference.fp8_row_scales). One program a row, two
passes over it (the second from cache): the activation side of an fp8 matmul (batchllm/quant/fp8.py). Bit for
bit the result of reference.quantize_rows_fp8.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even), saturated at +-448, still in fp32."""
    # a NaN stays NaN, as in torch's cast (not clamped to +-448)
    x = tl.maximum(x.to(tl.float32), -448.0, propagate_nan=tl.PropagateNan.ALL)
    x = tl.minimum(x, 448.0, propagate_nan=tl.PropagateNan.ALL)
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # subnormals are spaced like the smallest normal binade
    ulp = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3): 3 mantissa bits
    inv_ulp = ((127 - (exp - 3)) << 23).to(tl.float32, bitcast=True)  # 2^(3 - exp)
    q = x * inv_ulp  # exact: a power of 2 (no division, whose GPU form is approximate)
    r = tl.floor(q)
    frac = q - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    return r * ulp


@triton.jit
def _pow2_scale(amax):
    """reference.fp8_row_scales' exponent: the smallest e with amax <= 448 * 2^e (-100 for 0), from amax's bits."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # amax = m * 2^e, m in [1, 2)
    e = tl.where((bits & 0x7FFFFF) <= 0x600000, e - 8, e - 7)  # m <= 1.75: 448 = 1.75 * 2^8
    e = tl.where(amax > 0, e, -100)
    e = tl.minimum(tl.maximum(e, -100), 126)
    return e


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    e = _pow2_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, ((e + 127) << 23).to(tl.float32, bitcast=True))  # 2^e
    inv_scale = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e: x * it is exact
    for k in range(0, K, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, round_to_e4m3(x * inv_scale).to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (float8_e4m3fn [M, K], fp32 scales [M])."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(2048, triton.next_power_of_2(k))
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block,
                                    num_warps=4 if block >= 1024 else 1)
    return q, scale
