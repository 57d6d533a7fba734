"""Rotary embedding and SiLU-mul as Triton kernels (CUDA), one pass each.

Same arguments and results as `batchllm.layers.fused._rotary` / `_silu_and_mul`, with the math in float32 and
one rounding to the tensor dtype at the end (as torch.compile's fused versions do). torch.compile's kernels for
these two ran at ~1/7 (rotary) and ~1/2 (SiLU-mul) of the copy bandwidth on an H100 (docs/benchmarks.md, H6):
its dynamic-shape code indexes every element with divisions and cannot split the roll into two halves.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr,  # [num_tokens, num_heads, head_dim], head_dim contiguous
    cos_ptr,  # [num_tokens, head_dim] contiguous
    sin_ptr,  # [num_tokens, head_dim] contiguous, sign-folded (-sin on the first half)
    out_ptr,  # [num_tokens, num_heads, head_dim] contiguous
    num_heads,
    stride_xt, stride_xh,  # x strides (token, head)
    HALF: tl.constexpr,  # head_dim // 2
    HALF_PAD: tl.constexpr,  # HALF rounded up to a power of 2
    BLOCK_H: tl.constexpr,  # heads per program
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (i < HALF)
    x = x_ptr + t * stride_xt + h * stride_xh + i
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * 2 * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    # roll by HALF: the first half reads the second, the second the first
    o = out_ptr + (t * num_heads + h) * 2 * HALF + i
    tl.store(o, (x1 * c1 + x2 * s1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim] (any token/head strides, head_dim contiguous, even); cos, sin:
    [num_tokens, 1, head_dim] -> x * cos + roll(x, head_dim / 2) * sin, contiguous."""
    n, heads, d = x.shape
    assert x.stride(2) == 1 and d % 2 == 0
    cos, sin = cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous()
    out = torch.empty((n, heads, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_h = min(triton.next_power_of_2(heads), 16)
    _rotary_kernel[(n, triton.cdiv(heads, block_h))](
        x, cos, sin, out, heads, x.stride(0), x.stride(1),
        HALF=d // 2, HALF_PAD=triton.next_power_of_2(d // 2), BLOCK_H=block_h)
    return out


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * n] contiguous: gate, then up
    out_ptr,  # [num_tokens, n] contiguous
    n,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    gate = tl.load(x_ptr + t * 2 * n + j, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * n + n + j, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(gate))  # sigmoid from exp(-|gate|): no overflow for large negative gates
    out = gate * tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * up
    tl.store(out_ptr + t * n + j, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * n] (gate, up) -> silu(gate) * up: [num_tokens, n]."""
    x = x.contiguous()
    rows, n2 = x.shape
    n = n2 // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(n), 2048)
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, BLOCK=block)
    return out
