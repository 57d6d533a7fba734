"""Paged attention layer: writes this step's K/V into the paged cache, then attends through block tables.

The backend is picked once per engine: Triton kernels on CUDA (batchllm.kernels.attention/cache), the
pure-torch reference (batchllm.kernels.reference) elsewhere. Both take the same AttentionMetadata.
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


class _TorchBackend:
    def __init__(self):
        from batchllm.kernels import reference

        self.cache = reference.reshape_and_cache
        self.attend = reference.paged_attention

    def __call__(self, q, k, v, key_cache, value_cache, meta, scale, out):
        self.cache(k, v, key_cache, value_cache, meta.slot_mapping)
        return self.attend(q, key_cache, value_cache, meta.query_start_loc, meta.seq_lens, meta.block_table,
                           scale=scale, out=out)


class _TritonBackend:
    def __init__(self):
        from batchllm.kernels import attention, cache

        self.cache = cache.reshape_and_cache
        self.attend = attention.unified_attention

    def __call__(self, q, k, v, key_cache, value_cache, meta, scale, out):
        self.cache(k, v, key_cache, value_cache, meta.slot_mapping)
        return self.attend(q, key_cache, value_cache, meta.query_start_loc, meta.seq_lens, meta.block_table,
                           scale=scale, out=out, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)


def make_backend(name: str):
    """name: 'torch' (reference, any device) or 'triton' (CUDA)."""
    return {"torch": _TorchBackend, "triton": _TritonBackend}[name]()


class PagedAttention(nn.Module):
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.key_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim], bound by the runner
        self.value_cache: torch.Tensor | None = None
        self.backend = None

    def forward(self, q, k, v, meta: AttentionMetadata):
        out = torch.empty_like(q)
        return self.backend(q, k, v, self.key_cache, self.value_cache, meta, self.scale, out)
