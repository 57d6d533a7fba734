"""The CPU attention kernel (kernels/cpu_attention.c through kernels/cpu.py) against the pure-torch reference."""
import pytest
import torch

from batchllm.kernels import cpu, reference

if cpu.load() is None:  # no C compiler: the engine falls back to the reference, and this file has nothing to test
    pytest.skip("CPU attention kernel unavailable (no C compiler)", allow_module_level=True)

# (query lens, context lens): pure decode, pure prefill, prefill over a cached prefix, and a mix of all three
BATCHES = [
    ([1] * 7, [0, 5, 16, 17, 40, 63, 200]),
    ([3, 16, 33], [0, 0, 0]),
    ([9, 20], [16, 37]),
    ([1, 12, 1, 5, 1, 40], [30, 0, 99, 11, 1, 64]),
]


def _cpu_layout(key_cache):
    """[num_blocks, block_size, kv_heads, dim] -> the C kernels' key layout [num_blocks, kv_heads, dim, block_size]."""
    return key_cache.permute(0, 2, 3, 1).contiguous()


def _both(b, query=None, **kw):
    """(C kernel, reference) on one batch."""
    q = b["query"] if query is None else query
    rest = (b["query_start_loc"], b["seq_lens"], b["block_table"])
    return (cpu.paged_attention(q, _cpu_layout(b["key_cache"]), b["value_cache"], *rest, **kw),
            reference.paged_attention(q.contiguous(), b["key_cache"], b["value_cache"], *rest, **kw))


def _case(q_lens, ctx_lens, heads, kv_heads, dim, block, dtype, seed, paged_batch):
    return _both(paged_batch(q_lens, ctx_lens, heads, kv_heads, dim, block, dtype, "cpu", seed))


@pytest.mark.parametrize("batch", range(len(BATCHES)))
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 2, 32), (6, 1, 80)])
@pytest.mark.parametrize("block", [16, 32, 8])
def test_fp32_matches_reference(batch, heads, kv_heads, dim, block, paged_batch, relative_error):
    seed = hash((batch, heads, dim, block)) % 10_000
    out, ref = _case(*BATCHES[batch], heads, kv_heads, dim, block, torch.float32, seed, paged_batch)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("batch", range(len(BATCHES)))
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (32, 8, 128)])
def test_bf16_matches_reference(batch, heads, kv_heads, dim, paged_batch, relative_error):
    out, ref = _case(*BATCHES[batch], heads, kv_heads, dim, 16, torch.bfloat16, 7 + batch, paged_batch)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2


def test_strided_query_and_scale(paged_batch, relative_error):
    """The engine passes q as a view of the fused q/k tensor: rows strided by (heads + kv_heads) * dim."""
    b = paged_batch([1, 7, 1], [20, 3, 50], 8, 2, 64, 16, torch.float32, "cpu", 3)
    qk = torch.randn(b["query"].shape[0], 10, 64)
    out, ref = _both(b, query=qk[:, :8], scale=0.3)
    assert relative_error(out, ref) < 1e-5


def test_large_scores_stay_finite(paged_batch):
    """Softmax subtracts the row max: scores in the thousands must not overflow to inf/NaN."""
    b = paged_batch([1, 4], [100, 10], 4, 2, 64, 16, torch.float32, "cpu", 5)
    b["query"] *= 300.0
    out, ref = _both(b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_other_dtypes_and_layouts_are_refused(paged_batch):
    b = paged_batch([1, 3], [5, 0], 4, 2, 16, 16, torch.float64, "cpu", 1)
    rest = (b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"])
    with pytest.raises(ValueError, match="float32/bfloat16"):
        cpu.paged_attention(b["query"], _cpu_layout(b["key_cache"]), *rest)
    b = paged_batch([1, 3], [5, 0], 4, 2, 16, 16, torch.float32, "cpu", 1)
    rest = (b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"])
    with pytest.raises(ValueError):  # the reference's key layout
        cpu.paged_attention(b["query"], b["key_cache"], *rest)
