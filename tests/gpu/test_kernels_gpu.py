"""The Triton kernels on a CUDA GPU at real sizes, against kernels/reference.py.

Run on a GPU machine from the repository root:  PYTHONPATH=$PWD python -m pytest -m gpu tests/gpu -q
(pyproject's addopts deselect `gpu` tests by default; they also skip themselves without CUDA.)
The kernel modules are imported inside the tests, never at collection: on a CPU-only run the kernel
tests' conftest must switch Triton to its interpreter before any @triton.jit decorates a kernel.
"""
import contextlib

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128


def _kernels():
    pytest.importorskip("triton", reason="triton is not installed")
    from batchllm.kernels import attention, cache, reference

    return attention, cache, reference


def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _batch(q_lens, ctx_lens, dtype, block_size=16, seed=0, num_blocks=None, high=False):
    """A random batch over a random paged cache on the GPU: each sequence's blocks are a shuffled,
    non-contiguous set of physical blocks; with high=True they are taken from the top of the cache
    (element offsets past 2^31 when the cache is that large)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    per_seq = [-(-s // block_size) for s in seq_lens]
    need = sum(per_seq)
    num_blocks = num_blocks or need + 64
    pool = torch.randperm(need + 64, device="cuda", generator=gen)
    if high:
        pool = num_blocks - 1 - pool  # the top need+64 blocks, shuffled
    max_blocks = max(per_seq)
    table = torch.full((len(q_lens), max_blocks), -1, dtype=torch.int32, device="cuda")
    i = 0
    for s, nb in enumerate(per_seq):
        table[s, :nb] = pool[i : i + nb].to(torch.int32)
        i += nb
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    query = torch.randn((sum(q_lens), NUM_HEADS, HEAD_DIM), device="cuda", dtype=dtype, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return dict(
        query=query, key_cache=key_cache, value_cache=value_cache, query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), block_table=table,
    ), dict(max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def _reference(reference, b, out_like):
    # fp32 reference through SDPA's math backend (no tf32): K/V upcast after the gather.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return reference.paged_attention(
            b["query"].float(), b["key_cache"], b["value_cache"], b["query_start_loc"], b["seq_lens"],
            b["block_table"],
        )


def _check(b, hints, dtype, tol=None, **kw):
    attention, _, reference = _kernels()
    out = torch.full_like(b["query"], float("nan"))
    attention.unified_attention(
        b["query"], b["key_cache"], b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"],
        out=out, **hints, **kw,
    )
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN output"
    ref = _reference(reference, b, out)
    err = _rel_err(out, ref)
    tol = tol or (1e-4 if dtype == torch.float32 else 1e-2)
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    return err


def _mixed_lens(seed, num_decode=48, num_prefill=16, max_ctx=8192):
    g = torch.Generator().manual_seed(seed)
    dec_ctx = torch.randint(1, max_ctx, (num_decode,), generator=g).tolist()
    pre_q = torch.randint(16, 513, (num_prefill,), generator=g).tolist()
    pre_ctx = torch.randint(0, 4097, (num_prefill,), generator=g).tolist()
    pre_ctx[:4] = [0, 0, 0, 0]  # fresh prefills too
    q_lens = [1] * num_decode + pre_q
    ctx = dec_ctx + pre_ctx
    order = torch.randperm(len(q_lens), generator=g).tolist()  # interleave decode and prefill rows
    return [q_lens[i] for i in order], [ctx[i] for i in order]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_mixed_batch(dtype):
    q_lens, ctx = _mixed_lens(1)
    b, hints = _batch(q_lens, ctx, dtype, seed=1)
    _check(b, hints, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mixed_batch_decodes_first(dtype):
    # the engine's order (decode rows first) with the decodes in their own launch
    q_lens, ctx = _mixed_lens(5)
    order = sorted(range(len(q_lens)), key=lambda i: q_lens[i] != 1)
    q_lens, ctx = [q_lens[i] for i in order], [ctx[i] for i in order]
    b, hints = _batch(q_lens, ctx, dtype, seed=5)
    _check(b, hints, dtype, num_decodes=q_lens.count(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_block32(dtype):
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(1, 8192, (64,), generator=g).tolist()
    b, hints = _batch([1] * 64, ctx, dtype, block_size=32, seed=2)
    _check(b, hints, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_split_kv_long_decode(dtype):
    attention, _, _ = _kernels()
    b, hints = _batch([1] * 4, [32768, 30000, 17, 12345], dtype, seed=3)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert attention.choose_num_kv_splits(4, NUM_KV_HEADS, 1, hints["max_seq_len"], sms) > 1
    _check(b, hints, dtype)  # auto dispatch takes the split path
    _check(b, hints, dtype, num_kv_splits=1)  # and the one-pass path agrees


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_cache(dtype):
    """An fp8 (e4m3) cache under a bf16 / fp32 query: the engine's mixed step (decodes first, own launch), a
    decode-only step, and split-KV long decodes. The reference reads the same fp8 values."""
    q_lens, ctx = _mixed_lens(9)
    order = sorted(range(len(q_lens)), key=lambda i: q_lens[i] != 1)
    q_lens, ctx = [q_lens[i] for i in order], [ctx[i] for i in order]
    for b, hints, kw in (
        (*_batch(q_lens, ctx, dtype, seed=9), {"num_decodes": q_lens.count(1)}),
        (*_batch([1] * 64, ctx[:64] + [1] * (64 - len(ctx[:64])), dtype, seed=10), {}),
        (*_batch([1] * 4, [32768, 30000, 17, 12345], dtype, seed=11), {}),
    ):
        b["key_cache"] = b["key_cache"].to(torch.float8_e4m3fn)
        b["value_cache"] = b["value_cache"].to(torch.float8_e4m3fn)
        _check(b, hints, dtype, **kw)
        for f16_dot in (False, True):  # K/V widened to bf16 or to fp16 (with the query), either way
            _check(b, hints, dtype, config={"f16_dot": f16_dot}, **kw)


def test_reshape_and_cache_fp8():
    """The GPU's cast of the pre-rounded values gives torch's nearest-even e4m3, saturated, over 1e-4..1e4."""
    _, cache, reference = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(12)
    num_blocks, num_tokens = 4096, 8192
    shape = (num_blocks, 16, NUM_KV_HEADS, HEAD_DIM)
    caches = [torch.zeros(shape, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(4)]
    kv = torch.randn(num_tokens, 2 * NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
    kv = (kv * torch.exp(3 * torch.randn(kv.shape, device="cuda", generator=gen))).to(torch.bfloat16)
    kv[5, 0, 3] = float("nan")  # stays NaN (not clamped to +-448)
    key, value = kv[:, :NUM_KV_HEADS], kv[:, NUM_KV_HEADS:]
    slots = torch.randperm(num_blocks * 16, device="cuda", generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, device="cuda", generator=gen)[:500]] = -1
    free = torch.ones(num_blocks * 16, dtype=torch.bool, device="cuda")
    free[slots[slots >= 0]] = False
    slots[5] = free.nonzero()[0, 0]  # the NaN's token is written, to a slot of its own
    reference.reshape_and_cache(key, value, caches[0], caches[1], slots)
    cache.reshape_and_cache(key, value, caches[2], caches[3], slots)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert torch.equal(got.float().isnan(), want.float().isnan())
        assert torch.equal(got.float().nan_to_num(), want.float().nan_to_num())
    assert caches[2].float().isnan().sum() == 1
    assert caches[0].float().nan_to_num().abs().max() == 448.0


def test_quantize_rows_fp8():
    """kernels/fp8.py at llama3-8b's widest activation (a 4096-token step into down_proj): bit for bit the
    reference, and the fp8 matmul built on it within fp8's error of the bf16 one."""
    from batchllm.kernels import fp8
    from batchllm.quant.fp8 import fp8_linear

    _, _, reference = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(4096, 14336, device="cuda", generator=gen)
    x = (x * torch.exp(2 * torch.randn(4096, 1, device="cuda", generator=gen))).to(torch.bfloat16)
    q, scale = fp8.quantize_rows(x)
    q_ref, scale_ref = reference.quantize_rows_fp8(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.float(), q_ref.float())
    w = (torch.randn(4096, 14336, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    qw, ws = reference.quantize_rows_fp8(w)
    out = fp8_linear(x[:512], qw, ws, None)
    exact = x[:512].float() @ w.float().T
    assert out.dtype == torch.bfloat16 and _rel_err(out, exact) < 0.05


def test_no_host_sync_and_cuda_graph():
    attention, _, reference = _kernels()
    for q_lens, ctx in (([1] * 4, [20000, 5, 900, 31000]), _mixed_lens(4, 8, 4, 2048)):
        b, hints = _batch(q_lens, ctx, torch.bfloat16, seed=4)
        args = [b[k] for k in ("query", "key_cache", "value_cache", "query_start_loc", "seq_lens", "block_table")]
        out = torch.empty_like(b["query"])
        attention.unified_attention(*args, out=out, **hints)  # compile outside the checks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            attention.unified_attention(*args, out=out, **hints)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # Capture once, then change the inputs in place (shorter sequences, new queries) and replay.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attention.unified_attention(*args, out=out, **hints)
        b["seq_lens"].sub_(torch.randint(0, 3, b["seq_lens"].shape, device="cuda", dtype=torch.int32)
                           * (b["query_start_loc"][1:] - b["query_start_loc"][:-1] == 1))
        b["query"].copy_(torch.randn_like(b["query"]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, _reference(reference, b, out)) < 1e-2


def test_int64_offsets():
    # A cache past 2^31 elements per tensor (2 x 4.3 GB bf16): writes and reads at the top of it.
    attention, cache, _ = _kernels()
    per_block = 16 * NUM_KV_HEADS * HEAD_DIM
    num_blocks = 2**31 // per_block + 512
    assert num_blocks * per_block > 2**31
    q_lens, ctx = [1] * 6 + [100, 37], [4000, 1, 2047, 300, 9000, 77, 0, 4000]
    b, hints = _batch(q_lens, ctx, torch.bfloat16, seed=5, num_blocks=num_blocks, high=True)
    assert int(b["block_table"].max()) * per_block > 2**31
    # The new tokens' K/V go in through the cache kernel at their slots (all past 2^31 elements).
    seq_lens, bs = b["seq_lens"].tolist(), 16
    slots = []
    for s, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        for pos in range(sl - ql, sl):
            slots.append(int(b["block_table"][s, pos // bs]) * bs + pos % bs)
    slot_mapping = torch.tensor(slots + [-1, -1], dtype=torch.int64, device="cuda")
    new_k = torch.randn(len(slots) + 2, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    cache.reshape_and_cache(new_k, new_v, b["key_cache"], b["value_cache"], slot_mapping)
    flat_k = b["key_cache"].view(-1, NUM_KV_HEADS, HEAD_DIM)
    flat_v = b["value_cache"].view(-1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat_k[slot_mapping[:-2]], new_k[:-2])
    assert torch.equal(flat_v[slot_mapping[:-2]], new_v[:-2])
    _check(b, hints, torch.bfloat16)
    _check(b, hints, torch.bfloat16, num_kv_splits=8)
    del b, flat_k, flat_v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reshape_and_cache(dtype):
    _, cache, reference = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(6)
    num_blocks, num_tokens = 4096, 8192
    shape = (num_blocks, 16, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    qkv = torch.randn(num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    key, value = qkv[:, NUM_HEADS : NUM_HEADS + NUM_KV_HEADS], qkv[:, NUM_HEADS + NUM_KV_HEADS :]
    slots = torch.randperm(num_blocks * 16, device="cuda", generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, device="cuda", generator=gen)[:500]] = -1
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
    cache.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, ref_k) and torch.equal(value_cache, ref_v)


with contextlib.suppress(Exception):  # keep tf32 out of the fp32 reference's matmuls
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_and_silu_and_mul_at_real_sizes(dtype):
    """kernels/elementwise.py at llama3-8b's shapes (a 4096-token step): one rounding from the float32 result."""
    from batchllm.kernels import elementwise
    from batchllm.layers import fused

    gen = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(4096, 48, 128, device="cuda", generator=gen).to(dtype)
    cos = torch.randn(4096, 1, 128, device="cuda", generator=gen).to(dtype)
    sin = torch.randn(4096, 1, 128, device="cuda", generator=gen).to(dtype)
    x = qkv[:, :40]  # q and k heads of the fused projection, as the engine passes them
    ref = fused._rotary(x.float(), cos.float(), sin.float())
    eps = torch.finfo(dtype).eps
    assert ((elementwise.rotary(x, cos, sin).float() - ref).abs() <= eps * ref.abs() + 1e-6).all()
    gu = (torch.randn(4096, 2 * 14336, device="cuda", generator=gen) * 4).to(dtype)
    ref = fused._silu_and_mul(gu.float())
    assert ((elementwise.silu_and_mul(gu).float() - ref).abs() <= eps * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("m", [1, 7, 16, 100, 191, 192, 600, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_awq_matmul_at_real_sizes(m, dtype):
    """kernels/awq.py's awq_matmul on llama3-8b's down_proj (K 14,336, N 4,096, groups of 128) and gate_up (N 28,672),
    fresh random 4-bit weights, against the reference's fp32 product: the fused kernel below DEQUANTIZE_FROM_M rows
    (K split at decode sizes), the dequantized weight (into a scratch buffer, as the engine does) and cuBLAS from
    there; and the fused kernel forced at the large sizes too."""
    from batchllm.kernels import awq, reference

    gen = torch.Generator(device="cuda").manual_seed(m)
    scratch = torch.empty(4096 * 28672, dtype=dtype, device="cuda")
    for k, n in ((14336, 4096), (4096, 28672)):
        qw = torch.randint(-2**31, 2**31 - 1, (k, n // 8), device="cuda", generator=gen, dtype=torch.int64).int()
        qz = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), device="cuda", generator=gen,
                           dtype=torch.int64).int()
        s = (torch.rand(k // 128, n, device="cuda", generator=gen) * 0.004 + 0.001).half()
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        want = reference.awq_linear(x, qw, qz, s)
        for got in (awq.awq_matmul(x, qw, qz, s, scratch), awq.awq_gemm(x, qw, qz, s)):
            assert got.dtype == dtype and _rel_err(got, want) < 1e-2, (k, n)
        if m == 192:
            w = awq.awq_dequantize(qw, qz, s, torch.float32)
            assert torch.equal(w, reference.awq_dequantize(qw, qz, s))
