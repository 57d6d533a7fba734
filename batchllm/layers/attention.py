"""Paged attention layer: writes this step's K/V into the paged cache, then attends through block tables.

The backend is picked once per engine: Triton kernels on CUDA (batchllm.kernels.attention/cache), the C kernel
on the CPU (batchllm.kernels.cpu, which falls back to the reference where it cannot be built), or the pure-torch
reference (batchllm.kernels.reference). All take the same AttentionMetadata.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_table: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding (not written)
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0  # the first num_decodes sequences have query_len 1 (the scheduler puts decodes first)


def _standard_shape(num_blocks, block_size, num_kv_heads, head_dim) -> tuple:
    return (num_blocks, block_size, num_kv_heads, head_dim)


class _Backend:
    """Writes the step's K/V into the cache, then attends: the same call for the reference, C and Triton.
    key_cache_shape(num_blocks, block_size, num_kv_heads, head_dim) is the key cache this backend reads (the value
    cache is always [num_blocks, block_size, num_kv_heads, head_dim])."""

    def __init__(self, cache_fn, attend_fn, takes_max_lens: bool, key_cache_shape=_standard_shape):
        self.cache, self.attend, self.takes_max_lens = cache_fn, attend_fn, takes_max_lens
        self.key_cache_shape = key_cache_shape

    def __call__(self, q, k, v, key_cache, value_cache, meta, scale, out):
        self.cache(k, v, key_cache, value_cache, meta.slot_mapping)
        extra = {}
        if self.takes_max_lens:
            extra = dict(max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, num_decodes=meta.num_decodes)
        return self.attend(q, key_cache, value_cache, meta.query_start_loc, meta.seq_lens, meta.block_table,
                           scale=scale, out=out, **extra)


def make_backend(name: str, dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None) -> _Backend:
    """name: 'torch' (the reference, any device), 'cpu' (the C kernels, where they take `dtype` and the cache is
    in it too, else the reference) or 'triton' (CUDA). kv_dtype: the cache's dtype (None: dtype)."""
    if name == "cpu":
        from batchllm.kernels import cpu

        if cpu.supports(dtype) and kv_dtype in (None, dtype):
            return _Backend(cpu.reshape_and_cache, cpu.paged_attention, False, cpu.key_cache_shape)
        name = "torch"
    if name == "torch":
        from batchllm.kernels import reference

        return _Backend(reference.reshape_and_cache, reference.paged_attention, takes_max_lens=False)
    if name == "triton":
        from batchllm.kernels import attention, cache

        return _Backend(cache.reshape_and_cache, attention.unified_attention, takes_max_lens=True)
    raise ValueError(f"unknown attention backend {name!r}")


class PagedAttention(nn.Module):
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.key_cache: torch.Tensor | None = None  # backend.key_cache_shape(...), bound by the runner
        self.value_cache: torch.Tensor | None = None
        self.backend = None

    def forward(self, q, k, v, meta: AttentionMetadata, out=None):
        """out: where to write (a static buffer of the piecewise CUDA graphs), else a new tensor."""
        if out is None:
            out = torch.empty_like(q)
        return self.backend(q, k, v, self.key_cache, self.value_cache, meta, self.scale, out)
