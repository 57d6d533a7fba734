"""Kernel tests: Triton kernels against kernels/reference.py.

Without a CUDA GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors.
The variable must be set before any @triton.jit runs (triton picks the interpreter at decoration
time), so it is set here, before the test modules import batchllm.kernels.attention / .cache.
Without triton installed the test modules skip themselves (pytest.importorskip).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def paged_batch():
    return make_paged_batch


@pytest.fixture
def relative_error():
    return rel_err


def make_paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed,
                     spare_blocks=3):
    """A random batch over a random paged cache: shuffled, non-contiguous physical blocks.

    Returns query [num_tokens, num_heads, head_dim], key_cache/value_cache
    [num_blocks, block_size, num_kv_heads, head_dim], query_start_loc [num_seqs+1] int32,
    seq_lens [num_seqs] int32, block_table [num_seqs, max_blocks] int32 (padded with -1).
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 1
    table = torch.full((len(q_lens), max_blocks), -1, dtype=torch.int32)
    i = 0
    for s, nb in enumerate(blocks_per_seq):
        table[s, :nb] = torch.tensor(perm[i : i + nb], dtype=torch.int32)
        i += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn((sum(q_lens), num_heads, head_dim), generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return dict(
        query=query.to(device),
        key_cache=key_cache.to(device),
        value_cache=value_cache.to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        block_table=table.to(device),
    )


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()

