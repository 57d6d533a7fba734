"""Write a step's new K/V rows into the paged cache (Triton): `reshape_and_cache`.

Same arguments and effect as `reference.reshape_and_cache`: token t's K/V go to slot
`slot_mapping[t]` = block * block_size + offset; slot -1 (CUDA-graph padding) writes nothing.
One program copies one token's [num_kv_heads, head_dim] for both caches. Offsets are int64: a
layer's cache can hold more than 2^31 elements.

An fp8 cache (torch.float8_e4m3fn, kv_cache_dtype="fp8") stores each value rounded to nearest-even and
saturated at +-448, as torch's cast of the clamped value does (reference.to_cache_dtype), through
fp8.round_to_e4m3 (exact in Triton's interpreter too).
"""
import torch
import triton
import triton.language as tl

from batchllm.kernels.fp8 import round_to_e4m3


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    num_kv_heads,
    head_dim,
    stride_kt, stride_kh,  # key strides (token, head); head_dim is contiguous
    stride_vt, stride_vh,  # value strides (token, head)
    stride_kcb, stride_kcs, stride_kch,  # key_cache strides (block, slot, head)
    stride_vcb, stride_vcs, stride_vch,  # value_cache strides (block, slot, head)
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,  # the caches are float8_e4m3fn
    HEADS_PAD: tl.constexpr,  # num_kv_heads rounded up to a power of 2
    DIM_PAD: tl.constexpr,  # head_dim rounded up to a power of 2
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        k = round_to_e4m3(k)
        v = round_to_e4m3(v)
    tl.store(
        key_cache_ptr + block * stride_kcb + in_block * stride_kcs + h * stride_kch + d,
        k.to(key_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        value_cache_ptr + block * stride_vcb + in_block * stride_vcs + h * stride_vch + d,
        v.to(value_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """Write new K/V rows into the paged cache in place.

    key, value: [num_tokens, num_kv_heads, head_dim] (any token/head strides); key_cache, value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim] in key's dtype or float8_e4m3fn; slot_mapping:
    [num_tokens] int64, -1 skipped.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"key_cache {key_cache.dtype} and value_cache {value_cache.dtype} differ in dtype")
    if value.shape != key.shape or key_cache.shape[2:] != key.shape[1:] or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)} and caches "
            f"{tuple(key_cache.shape)}/{tuple(value_cache.shape)} do not fit"
        )
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens} tokens")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim")
    if num_tokens == 0:
        return
    heads_pad = triton.next_power_of_2(num_kv_heads)
    dim_pad = triton.next_power_of_2(head_dim)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads,
        head_dim,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[1],
        FP8=key_cache.dtype == torch.float8_e4m3fn,
        HEADS_PAD=heads_pad,
        DIM_PAD=dim_pad,
        num_warps=4 if heads_pad * dim_pad >= 1024 else 1,
    )
