"""unified_attention (Triton) against reference.paged_attention on fresh random paged batches.

Runs under the Triton interpreter on CPU (see conftest.py); shapes are kept small for that.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from batchllm.kernels import reference  # noqa: E402
from batchllm.kernels.attention import choose_num_kv_splits, unified_attention  # noqa: E402

# (query_lens, context_lens): context = seq_len - query_len, the cached prefix.
BATCHES = {
    "decode": ([1, 1, 1, 1], [5, 40, 17, 70]),
    "prefill": ([7, 33, 16], [0, 0, 0]),
    "prefix": ([9, 20], [16, 37]),
    "mixed": ([1, 12, 1, 30, 1], [50, 0, 3, 21, 77]),
}

# (batch, num_heads, num_kv_heads, head_dim, block_size): every batch kind against GQA 1, 2, 4 and 3
# (not a power of 2: padded query-head rows), both block sizes and both head dims.
FP32_CASES = [
    (batch, h, kvh, d, bs)
    for batch in BATCHES
    for h, kvh in ((4, 4), (4, 2), (8, 2), (6, 2))
    for d, bs in ((64, 16), (128, 32), (64, 32), (128, 16))
    if (h, kvh) != (6, 2) or (d, bs) == (64, 16)
]
# head_dim 128 chunks take the prefill default of 128 rows a program (kernels/attention_config.py)
BF16_CASES = [("mixed", 8, 2, 64, 16), ("decode", 4, 4, 128, 32), ("prefix", 4, 2, 64, 32), ("prefill", 8, 2, 128, 16),
              ("prefix", 8, 2, 128, 32)]


def _attend(b, q_lens, ctx_lens, caches=None, ref_caches=None, **kw):
    """unified_attention over paged batch b (through `caches` if given) into a NaN-filled out, and the reference
    (over `ref_caches` if given): float64 for fp32 queries, float32 for 16-bit ones (query upcast, K/V upcast
    after the gather). -> (out, ref)"""
    meta = (b["query_start_loc"], b["seq_lens"], b["block_table"])
    out = torch.full_like(b["query"], float("nan"))
    res = unified_attention(
        b["query"], *(caches or (b["key_cache"], b["value_cache"])), *meta, out=out, max_query_len=max(q_lens),
        max_seq_len=max(q + c for q, c in zip(q_lens, ctx_lens)), **kw,
    )
    assert res is out
    ref_dtype = torch.float64 if b["query"].dtype == torch.float32 else torch.float32
    ref = reference.paged_attention(b["query"].to(ref_dtype), *(ref_caches or (b["key_cache"], b["value_cache"])),
                                    *meta)
    assert not out.isnan().any(), "unwritten or NaN output rows (or a key read past its sequence)"
    return out, ref


def _run(batch, num_heads, num_kv_heads, head_dim, block_size, dtype, device, paged_batch, seed, **kw):
    q_lens, ctx_lens = BATCHES[batch]
    b = paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed)
    return _attend(b, q_lens, ctx_lens, **kw)


@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp32_matches_reference(case, device, paged_batch, relative_error):
    out, ref = _run(*case, torch.float32, device, paged_batch, seed=hash(case) % 1000)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_bf16_matches_reference(case, device, paged_batch, relative_error):
    out, ref = _run(*case, torch.bfloat16, device, paged_batch, seed=7)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case, splits", [(("mixed", 8, 2, 64, 16), 1), (("prefix", 4, 2, 128, 32), 1),
                                          (("decode", 8, 2, 64, 16), 4)])
def test_fp8_cache_matches_reference(case, splits, dtype, tol, device, paged_batch, relative_error):
    """An fp8 (e4m3) cache read by a bf16 / fp32 query: widened in the kernel, then the same attention. The
    reference reads the same fp8 values, so the error is the query dtype's alone."""
    q_lens, ctx_lens = BATCHES[case[0]]
    b = paged_batch(q_lens, ctx_lens, *case[1:], dtype, device, seed=23)
    k8, v8 = b["key_cache"].to(torch.float8_e4m3fn), b["value_cache"].to(torch.float8_e4m3fn)
    out, ref = _attend(b, q_lens, ctx_lens, caches=(k8, v8), ref_caches=(k8, v8), num_kv_splits=splits)
    assert relative_error(out, ref) < tol
    # and it did read the fp8 values: the full-precision cache gives a measurably different answer
    exact = reference.paged_attention(b["query"].double(), b["key_cache"], b["value_cache"], b["query_start_loc"],
                                      b["seq_lens"], b["block_table"])
    assert relative_error(ref, exact) > 1e-3


def test_cache_dtype_must_fit(device, paged_batch):
    b = paged_batch([1], [5], 4, 2, 64, 16, torch.float32, device, seed=1)
    with pytest.raises(ValueError, match="do not fit query"):
        unified_attention(b["query"], b["key_cache"].half(), b["value_cache"].half(), b["query_start_loc"],
                          b["seq_lens"], b["block_table"])


@pytest.mark.parametrize(
    "case, splits",
    [(("decode", 8, 2, 64, 16), 4), (("decode", 4, 4, 128, 32), 2), (("mixed", 4, 2, 64, 16), 8)],
    ids=["decode-gqa4-s4", "decode-d128-s2", "mixed-s8"],
)
def test_split_kv_matches_reference(case, splits, device, paged_batch, relative_error):
    # More segments than some sequences have tiles: empty segments must drop out of the reduction.
    out, ref = _run(*case, torch.float32, device, paged_batch, seed=11, num_kv_splits=splits)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize(
    "config",
    [{"tile_n": 16}, {"tile_n": 128}, {"block_m": 16}, {"block_m": 128, "tile_n": 32}, {"small_m": 0},
     {"small_m": 32}],
    ids=["tile16", "tile128", "block_m16", "block_m128", "no_small_tile", "small_m32"],
)
def test_tile_shapes(config, device, paged_batch, relative_error):
    # K/V tiles smaller than, equal to and spanning several paged blocks; query tiles of 1..32 tokens.
    out, ref = _run("mixed", 8, 2, 64, 32, torch.float32, device, paged_batch, seed=13, config=config)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("batch, splits", [("mixed", 1), ("decode", 1), ("decode", 4), ("prefix", 1)])
@pytest.mark.parametrize("head_major, heads_inner", [(False, False), (True, False), (True, True)])
def test_program_order_and_head_major_cache(batch, splits, head_major, heads_inner, device, paged_batch,
                                            relative_error):
    # both program orders (config heads_inner: KV-head-fastest, the default; or sequence-fastest); and a cache
    # laid out head-major in memory, passed as a [num_blocks, block_size, num_kv_heads, head_dim] view: the
    # kernel reads it through its strides.
    q_lens, ctx_lens = BATCHES[batch]
    b = paged_batch(q_lens, ctx_lens, 8, 4, 64, 16, torch.float32, device, seed=23)
    k, v = b["key_cache"], b["value_cache"]
    if head_major:
        k = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert k.stride(2) == 16 * 64  # really head-major
    out, ref = _attend(b, q_lens, ctx_lens, caches=(k, v), num_kv_splits=splits, config={"heads_inner": heads_inner})
    assert relative_error(out, ref) < 1e-4


def _poison(b, block_size):
    """NaN in every cache slot that holds no position < seq_len (the tail of each sequence's last block, the
    spare blocks), so a read past a sequence's keys turns the output NaN. Block 0, where a masked block-table
    load points, is made a spare one first."""
    table = b["block_table"].cpu()
    spare = sorted(set(range(b["key_cache"].shape[0])) - set(table.flatten().tolist()))[0]
    if spare != 0:  # relabel: block 0's contents and table entries move to the spare block's number
        for name in ("key_cache", "value_cache"):
            c = b[name]
            c[[0, spare]] = c[[spare, 0]]
        table[table == 0] = spare
        b["block_table"] = table.to(b["block_table"].device)
    seq_lens = b["seq_lens"].cpu().tolist()
    live = torch.zeros(b["key_cache"].shape[:2], dtype=torch.bool)
    for s, n in enumerate(seq_lens):
        for p in range(n):
            live[table[s, p // block_size], p % block_size] = True
    assert not live[0].any()
    dead = ~live.to(b["key_cache"].device)
    for name in ("key_cache", "value_cache"):
        c = b[name].float()
        c[dead] = float("nan")
        b[name] = c.to(b[name].dtype)


# (query_lens, context_lens, num_heads, num_kv_heads, query dtype, cache dtype, kwargs): chunks long enough for
# several unmasked tiles before the diagonal in the 128-row prefill default, a first row whose position + 1 is
# a multiple of the tile (31 + 1 at tile_n 32), an fp8 cache, GQA 1/2/8, fp16, forced split-KV, the other order.
_LONG = ([70, 1, 40], [130, 200, 31])
IN_RANGE_CASES = {
    "bf16-gqa4": (*_LONG, 8, 2, torch.bfloat16, None, {}),
    "bf16-gqa1": (*_LONG, 4, 4, torch.bfloat16, None, {}),
    "bf16-gqa2": (*_LONG, 8, 4, torch.bfloat16, None, {}),
    "bf16-gqa8": (*_LONG, 8, 1, torch.bfloat16, None, {}),
    "fp16": (*_LONG, 8, 2, torch.float16, None, {}),
    "fp8-cache": (*_LONG, 8, 2, torch.bfloat16, torch.float8_e4m3fn, {}),
    "split4": (*_LONG, 8, 2, torch.bfloat16, None, {"num_kv_splits": 4}),
    "seq-fastest": (*_LONG, 8, 2, torch.bfloat16, None, {"config": {"heads_inner": False}}),
    "fp32-tile16": (*_LONG, 8, 2, torch.float32, None, {"config": {"tile_n": 16}}),
}


@pytest.mark.parametrize("case", IN_RANGE_CASES.values(), ids=IN_RANGE_CASES.keys())
def test_long_chunks_read_only_their_keys(case, device, paged_batch, relative_error):
    q_lens, ctx_lens, heads, kv_heads, dtype, cache_dtype, kw = case
    b = paged_batch(q_lens, ctx_lens, heads, kv_heads, 128, 16, dtype, device, seed=29)
    if cache_dtype is not None:
        b["key_cache"], b["value_cache"] = b["key_cache"].to(cache_dtype), b["value_cache"].to(cache_dtype)
    _poison(b, 16)
    clean = tuple(torch.nan_to_num(c.float()).to(c.dtype) for c in (b["key_cache"], b["value_cache"]))
    out, ref = _attend(b, q_lens, ctx_lens, ref_caches=clean, **kw)
    assert relative_error(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("config", [{"block_m": 64, "small_m": 32}, {"block_m": 128, "small_m": 32, "tile_n": 32}])
def test_small_tile_takes_multi_token_tails(config, device, paged_batch, relative_error):
    # chunk tails of several tokens (20 = 16 + 4 at 16 tokens a program, 37 = 32 + 5) run on the small tile
    q_lens, ctx_lens = [20, 37, 1, 6], [7, 33, 12, 0]
    b = paged_batch(q_lens, ctx_lens, 8, 2, 64, 16, torch.float32, device, seed=37)
    out, ref = _attend(b, q_lens, ctx_lens, config=config)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("splits", [1, 4])
def test_padding_rows_untouched(splits, device, paged_batch):
    # CUDA-graph padding: query rows past query_start_loc[-1] belong to no sequence and stay as they were.
    b = paged_batch([1, 1, 1], [30, 9, 64], 4, 2, 64, 16, torch.float32, device, seed=17)
    q = torch.cat([b["query"], torch.randn(2, 4, 64, device=device)])
    out = torch.full_like(q, float("nan"))
    unified_attention(q, b["key_cache"], b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"],
                      out=out, max_query_len=1, max_seq_len=65, num_kv_splits=splits)
    assert not out[:3].isnan().any()
    assert out[3:].isnan().all()


def test_decode_launch_skips_empty_sequences(device, paged_batch, relative_error):
    # a decode-only launch (max_query_len 1) runs one program a sequence: one with no token writes nothing
    b = paged_batch([1, 0, 1, 0], [30, 9, 64, 3], 4, 2, 64, 16, torch.float32, device, seed=19)
    q = torch.cat([b["query"], torch.randn(1, 4, 64, device=device)])
    out = torch.full_like(q, float("nan"))
    unified_attention(q, b["key_cache"], b["value_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"],
                      out=out, max_query_len=1, max_seq_len=64)
    ref = reference.paged_attention(b["query"].double(), b["key_cache"], b["value_cache"], b["query_start_loc"],
                                    b["seq_lens"], b["block_table"])
    assert relative_error(out[:2], ref) < 1e-4
    assert out[2:].isnan().all()


def test_scale_and_strided_query(device, paged_batch, relative_error):
    # query as a view into a wider buffer (as a fused QKV projection leaves it), explicit scale.
    q_lens, ctx_lens = BATCHES["mixed"]
    b = paged_batch(q_lens, ctx_lens, 4, 2, 64, 16, torch.float32, device, seed=3)
    wide = torch.randn(b["query"].shape[0], 8, 64, device=device)
    wide[:, 2:6] = b["query"]
    q = wide[:, 2:6]
    out = unified_attention(q, b["key_cache"], b["value_cache"], b["query_start_loc"], b["seq_lens"],
                            b["block_table"], scale=0.3)
    ref = reference.paged_attention(q.double(), b["key_cache"], b["value_cache"], b["query_start_loc"],
                                    b["seq_lens"], b["block_table"], scale=0.3)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("num_decodes", [0, 2, 3])
def test_decodes_first_in_their_own_launch(num_decodes, device, paged_batch, relative_error):
    # the engine's mixed batches: decode rows first; num_decodes=0 is the single launch it replaces
    q_lens, ctx_lens = [1, 1, 1, 12, 30, 5], [50, 3, 77, 0, 21, 16]
    b = paged_batch(q_lens, ctx_lens, 8, 2, 64, 16, torch.float32, device, 11)
    out, ref = _attend(b, q_lens, ctx_lens, num_decodes=num_decodes)
    assert relative_error(out, ref) < 1e-4


def test_split_dispatch_rule():
    # Decode-only, few (seq, kv head) pairs, long context: split to ~2 programs per SM.
    assert choose_num_kv_splits(4, 8, 1, 32768, num_sms=132) == 16
    # Enough programs already, or prefill in the batch, or short contexts: no split.
    assert choose_num_kv_splits(256, 8, 1, 4096, num_sms=132) == 1
    assert choose_num_kv_splits(4, 8, 7, 32768, num_sms=132) == 1
    assert choose_num_kv_splits(4, 8, 1, 200, num_sms=132) == 1


def test_reference_matches_dense(device):
    # The reference's own check: one fresh prefill over contiguous blocks equals plain causal attention.
    gen = torch.Generator().manual_seed(5)
    L, h, kvh, d, bs = 37, 4, 2, 32, 16
    q, k, v = (torch.randn(L, n, d, generator=gen, dtype=torch.float64) for n in (h, kvh, kvh))
    nb = -(-L // bs)
    kc = torch.randn(nb, bs, kvh, d, generator=gen, dtype=torch.float64)
    vc = torch.randn(nb, bs, kvh, d, generator=gen, dtype=torch.float64)
    kc.view(-1, kvh, d)[:L] = k
    vc.view(-1, kvh, d)[:L] = v
    out = reference.paged_attention(q, kc, vc, torch.tensor([0, L]), torch.tensor([L]),
                                    torch.arange(nb, dtype=torch.int32)[None])
    torch.testing.assert_close(out, reference.dense_causal_attention(q, k, v))


@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 1), (8, 2), (16, 8)])
def test_reference_mixed_batch_matches_per_sequence_attention(num_heads, num_kv_heads, paged_batch):
    # Decode rows (grouped, both matmul layouts: kvh <= 4 and > 4) and prefill over a cached prefix,
    # against attention written out per sequence on contiguous float64 K/V.
    q_lens, ctx_lens = [1, 1, 5, 1, 9], [40, 3, 20, 17, 0]
    b = paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, 32, 16, torch.float64, "cpu", seed=11)
    query, kc, vc, qsl, seq_lens, table = (b[k] for k in ("query", "key_cache", "value_cache", "query_start_loc",
                                                          "seq_lens", "block_table"))
    out = reference.paged_attention(query, kc, vc, qsl, seq_lens, table)
    qsl = qsl.tolist()
    group = num_heads // num_kv_heads
    for s, (ql, sl) in enumerate(zip(q_lens, seq_lens.tolist())):
        blocks = table[s][table[s] >= 0].long()
        k = kc[blocks].reshape(-1, num_kv_heads, 32)[:sl].repeat_interleave(group, dim=1)
        v = vc[blocks].reshape(-1, num_kv_heads, 32)[:sl].repeat_interleave(group, dim=1)
        q = query[qsl[s] : qsl[s + 1]]
        scores = torch.einsum("qhd,khd->hqk", q, k) * 32**-0.5
        pos = torch.arange(sl - ql, sl)[:, None]
        scores = scores.masked_fill(torch.arange(sl)[None, :] > pos, float("-inf"))
        want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        torch.testing.assert_close(out[qsl[s] : qsl[s + 1]], want)
