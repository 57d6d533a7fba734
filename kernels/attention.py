"""Unified paged attention in Triton: one launch serves a step's whole mixed batch.

`unified_attention` takes the flat batch the scheduler builds (vLLM's names, see kernels/reference.py):
prefill chunks (query_len > 1, possibly over a cached prefix: context = seq_len - query_len) and decode
tokens (query_len 1) side by side, and reads K/V only through block_table. It computes what
`reference.paged_attention` computes.

How the work is cut:
- A program owns one KV head and a tile of BLOCK_M query rows: BLOCK_Q consecutive tokens of one
  sequence times the QPK_PAD query heads that share that KV head (GQA packing), so each K/V tile is
  loaded once for all of them and the QK^T product has at least 16 rows even for a single decode token.
- With large prefill tiles (block_m >= 128) a program left with few tokens (a decode row in a mixed
  batch, a chunk's tail) switches to a 16-row tile inside the same launch (SMALL_Q), so it does not
  pay for the big tile's MMA work.
- Programs are numbered per sequence as `query_start_loc[s] // BLOCK_Q + s + i`, an upper bound that
  needs no host sync; each program finds its sequence by binary search and surplus programs exit. A
  decode-only launch (max_query_len 1) runs one program a sequence instead: no search, no surplus.
- K/V are walked in tiles of TILE_N cache positions; each position's physical block comes from the
  block table, so a tile may span several (non-contiguous) paged blocks. Online softmax in fp32 (exp2).
  In prefill launches the tiles every row of a program sees whole run without masks, and only the causal
  diagonal and the last partial tile with them (H200: 8k-token prefill 1.83 -> 1.58 ms a layer); decode
  launches keep one masked loop, which was faster at ~1k-token contexts (docs/kernels.md).
- Programs run KV-head-fastest (heads_inner): a sequence's KV heads side by side, reading each cache
  position's heads, which lie together in memory, at about the same time.
- An fp8 cache (float8_e4m3fn) is widened to the query's dtype right after each tile's load: half the bytes
  moved, the same MMAs.
- Split-KV (flash-decoding): with NUM_SEGMENTS > 1 the same kernel walks only its segment of the tiles
  and writes partial (max, sum, unnormalised acc) per segment; `_reduce_segments_kernel` combines them.
  Used for decode-only batches with too few (sequence, KV head) pairs to fill the GPU and long contexts.
"""
import inspect
import os

import torch
import triton
import triton.language as tl

from batchllm.kernels.attention_config import cap_stages, choose_num_kv_splits, default_config, device_limits

_LOG2E = 1.4426950408889634


def _jit_varying(ints=(), pointers=()):
    """triton.jit that does not specialise on arguments that change from step to step: the sequence count,
    the block table's width, and pointers into slices of a step's metadata (the decode/prefill split).
    Otherwise each new (value == 1, value % 16, pointer % 16) combination compiles the kernel again, a
    ~0.5 s stall in the middle of a run. None of them feeds a vectorised access."""
    params = inspect.signature(triton.jit).parameters
    kw = {"do_not_specialize": list(ints)}
    if "do_not_specialize_on_alignment" in params:
        kw["do_not_specialize_on_alignment"] = list(ints) + list(pointers)
    else:
        kw["do_not_specialize"] += list(pointers)
    return triton.jit(**kw)


@triton.jit
def _find_seq(
    query_start_loc_ptr,  # [num_seqs + 1] int32
    pid,
    num_seqs,
    BLOCK_Q: tl.constexpr,
):
    # Largest s with query_start_loc[s] // BLOCK_Q + s <= pid (sequence s's first program).
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@_jit_varying(ints=("num_seqs", "stride_bt"), pointers=("query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr"))
def _unified_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]                  written when NUM_SEGMENTS == 1
    part_max_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32      written when NUM_SEGMENTS > 1
    part_sum_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS, HEAD_DIM] fp32
    query_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    key_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    value_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_table_ptr,  # [num_seqs, max_num_blocks_per_seq] int32
    qk_scale,  # softmax scale * log2(e), fp32
    num_seqs,
    num_heads,
    stride_qt, stride_qh,  # query strides (token, head); head_dim is contiguous
    stride_ot, stride_oh,  # out strides (token, head)
    stride_kb, stride_ks, stride_kh,  # key_cache strides (block, slot, head)
    stride_vb, stride_vs, stride_vh,  # value_cache strides (block, slot, head)
    stride_bt,  # block_table row stride
    NUM_QPK: tl.constexpr,  # query heads per KV head
    QPK_PAD: tl.constexpr,  # NUM_QPK rounded up to a power of 2
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # BLOCK_Q * QPK_PAD rows per program
    SMALL_Q: tl.constexpr,  # 0, or: a program with <= SMALL_Q tokens left (decode rows, chunk tails)
    SMALL_M: tl.constexpr,  #   uses a SMALL_Q * QPK_PAD-row tile instead, not wasting the big one
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # paged block size
    TILE_N: tl.constexpr,  # cache positions per K/V tile
    NUM_SEGMENTS: tl.constexpr,  # 1: write out; > 1: write partials for _reduce_segments_kernel
    DECODE_ONLY: tl.constexpr,  # every sequence has one query token: program i serves sequence i
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots (no tf32)
    UPCAST: tl.constexpr,  # Triton's interpreter gets 16-bit dots wrong: do them in fp32 there
    F16_DOT: tl.constexpr,  # fp8 cache: widen K/V to fp16 (one conversion, 2 values an instruction), not bf16
    HEADS_INNER: tl.constexpr,  # program i serves KV head i % num_kv_heads: a sequence's heads run side by side
):
    if HEADS_INNER:
        num_kv_heads = num_heads // NUM_QPK
        pid_q = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
    else:
        pid_q = tl.program_id(0)
        kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    if DECODE_ONLY:  # one program a sequence: no search, no surplus programs (sequences of <= BLOCK_Q tokens)
        seq = pid_q
        q_begin = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
        q_first = 0
        if q_len == 0:
            return
    else:
        seq = _find_seq(query_start_loc_ptr, pid_q, num_seqs, BLOCK_Q)
        q_begin = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
        q_first = (pid_q - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
        if q_first >= q_len:
            return
    seq_len = tl.load(seq_lens_ptr + seq)

    if SMALL_Q > 0:
        if q_len - q_first <= SMALL_Q:
            _attend_rows(
                out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
                block_table_ptr, seq, kv_head, segment, q_begin, q_len, q_first, seq_len, qk_scale, num_heads,
                stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_bt,
                NUM_QPK, QPK_PAD, SMALL_Q, SMALL_M, HEAD_DIM, BLOCK_SIZE, TILE_N, NUM_SEGMENTS, IEEE, UPCAST, F16_DOT,
                DECODE_ONLY,
            )
        else:
            _attend_rows(
                out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
                block_table_ptr, seq, kv_head, segment, q_begin, q_len, q_first, seq_len, qk_scale, num_heads,
                stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_bt,
                NUM_QPK, QPK_PAD, BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE_N, NUM_SEGMENTS, IEEE, UPCAST, F16_DOT,
                DECODE_ONLY,
            )
    else:
        _attend_rows(
            out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
            block_table_ptr, seq, kv_head, segment, q_begin, q_len, q_first, seq_len, qk_scale, num_heads,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
            stride_vb, stride_vs, stride_vh, stride_bt,
            NUM_QPK, QPK_PAD, BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE_N, NUM_SEGMENTS, IEEE, UPCAST, F16_DOT,
            DECODE_ONLY,
        )


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, tile, kv_len, q_pos, qk_scale, block_row, k_head, v_head,
    stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every row sees every key of this tile, and the tile lies under kv_len
):
    """One K/V tile of the online softmax: returns the updated (row max, row sum, accumulator)."""
    offs_d = tl.arange(0, HEAD_DIM)
    k_pos = tile * TILE_N + tl.arange(0, TILE_N)
    k_ok = k_pos < kv_len
    # int64 before the multiply: block * stride passes 2^31 in large caches.
    if MASKED:
        block = tl.load(block_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    else:
        block = tl.load(block_row + k_pos // BLOCK_SIZE).to(tl.int64)
    in_block = (k_pos % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_head + (block * stride_kb + in_block * stride_ks)[None, :] + offs_d[:, None]  # [HEAD_DIM, TILE_N]
    v_ptrs = v_head + (block * stride_vb + in_block * stride_vs)[:, None] + offs_d[None, :]  # [TILE_N, HEAD_DIM]
    if MASKED:
        k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    k = k.to(q.dtype)  # an fp8 cache is widened here; UPCAST: fp32
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key at all
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    v = v.to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_rows(
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    part_max_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    part_sum_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS, HEAD_DIM] fp32
    query_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    key_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    value_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    block_table_ptr,  # [num_seqs, max_num_blocks_per_seq] int32
    seq, kv_head, segment,  # this program's sequence, KV head and KV segment
    q_begin, q_len, q_first, seq_len,  # the sequence's first query row, chunk length, this tile's first token
    qk_scale,
    num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_QPK: tl.constexpr,
    QPK_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    F16_DOT: tl.constexpr,
    DECODE_ONLY: tl.constexpr,
):
    """One tile of BLOCK_M rows (BLOCK_Q tokens x QPK_PAD heads of one KV head) over its K/V segment."""
    context_len = seq_len - q_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_local = q_first + offs_m // QPK_PAD  # token within this sequence's chunk
    head_in_group = offs_m % QPK_PAD
    head = kv_head * NUM_QPK + head_in_group
    row_ok = (q_local < q_len) & (head_in_group < NUM_QPK)
    token = (q_begin + q_local).to(tl.int64)
    q = tl.load(
        query_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    elif F16_DOT:  # exact for bf16 values within fp16's normal range (clamped to its max)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    q_pos = context_len + q_local  # cache position of each row; it sees keys 0..q_pos

    # Keys this tile of rows needs at all: up to the last row's position.
    kv_len = tl.minimum(seq_len, context_len + q_first + BLOCK_Q)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_lo = segment * tiles_per_segment
        tile_hi = tl.minimum(tile_lo + tiles_per_segment, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = key_cache_ptr + kv_head * stride_kh
    v_head = value_cache_ptr + kv_head * stride_vh

    if DECODE_ONLY:  # one loop, masked: at decode's ~1k-token contexts a second loop costs more than the masks
        for tile in range(tile_lo, tile_hi):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, kv_len, q_pos, qk_scale, block_row, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE_N, IEEE, True,
            )
    else:
        # Tiles every row of this program sees whole (keys before its first row's position, all under kv_len)
        # go without masks; the rest (the causal diagonal, the last partial tile) with them.
        num_full = (context_len + q_first + 1) // TILE_N
        for tile in range(tile_lo, tl.minimum(tile_hi, num_full)):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, kv_len, q_pos, qk_scale, block_row, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE_N, IEEE, False,
            )
        for tile in range(tl.maximum(tile_lo, num_full), tile_hi):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, kv_len, q_pos, qk_scale, block_row, k_head, v_head,
                stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE_N, IEEE, True,
            )

    if NUM_SEGMENTS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        part = (token * num_heads + head) * NUM_SEGMENTS + segment  # [BLOCK_M]
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


@_jit_varying(ints=("num_seqs",), pointers=("query_start_loc_ptr",))
def _reduce_segments_kernel(
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    part_max_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    part_sum_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS, HEAD_DIM] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    num_heads,
    stride_ot, stride_oh,  # out strides (token, head)
    NUM_SEGMENTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    # Rows past the last sequence (padding) were never computed: leave out untouched there.
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return
    segs = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = (token.to(tl.int64) * num_heads + head) * NUM_SEGMENTS
    m = tl.load(part_max_ptr + base + segs)
    l = tl.load(part_sum_ptr + base + segs)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.math.exp2(m - m_all)  # empty segments: exp2(-inf) = 0
    total = tl.sum(w * l, axis=0)
    acc = tl.load(part_acc_ptr + (base + segs)[:, None] * HEAD_DIM + offs_d[None, :])
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unified_attention(
    query,
    key_cache,
    value_cache,
    query_start_loc,
    seq_lens,
    block_table,
    scale=None,
    out=None,
    max_query_len=None,
    max_seq_len=None,
    num_kv_splits=None,
    config=None,
    num_decodes=0,
):
    """Causal paged attention of a mixed prefill/decode batch in one launch (two with split-KV).

    query: [num_tokens, num_heads, head_dim]; key_cache, value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim], in query's dtype or float8_e4m3fn; query_start_loc: [num_seqs + 1] int32;
    seq_lens: [num_seqs] int32; block_table: [num_seqs, max_num_blocks_per_seq] int32;
    out (optional): [num_tokens, num_heads, head_dim]. Returns out.

    max_query_len / max_seq_len: host ints the engine already knows; given both, no host sync happens
    (CUDA-graph safe). max_query_len must be the batch's true longest chunk (or more): 1 launches one program a
    sequence, which serves only sequences of one token (and skips empty ones). num_kv_splits: None chooses (choose_num_kv_splits), 1 never splits, n > 1 forces
    n segments (a power of 2). config: overrides default_config's keys (tuning).
    num_decodes: the first num_decodes sequences have one query token each (the engine puts decode rows
    first). In a batch that also has longer chunks they get their own launch with the decode tile: in one
    launch they would run with the prefill tile's 4x MMA work and register budget (docs/kernels.md).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or value_cache.shape != key_cache.shape:
        raise ValueError(f"cache shape {tuple(key_cache.shape)} does not fit query {tuple(query.shape)}")
    if key_cache.dtype not in (query.dtype, torch.float8_e4m3fn) or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"caches {key_cache.dtype}/{value_cache.dtype} do not fit query {query.dtype} "
                         "(the query's dtype or float8_e4m3fn, both alike)")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of 2 >= 16")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and caches need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(query)
    elif out.stride(-1) != 1:
        raise ValueError("out needs a contiguous head_dim")
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    scale = head_dim**-0.5 if scale is None else float(scale)
    if 0 < num_decodes < num_seqs and max_query_len != 1:
        common = dict(scale=scale, max_seq_len=max_seq_len, config=config)
        unified_attention(query[:num_decodes], key_cache, value_cache, query_start_loc[: num_decodes + 1],
                          seq_lens[:num_decodes], block_table[:num_decodes], out=out[:num_decodes],
                          max_query_len=1, num_kv_splits=1, **common)  # one variant: no split-KV compiles mid-run
        unified_attention(query[num_decodes:], key_cache, value_cache, query_start_loc[num_decodes:] - num_decodes,
                          seq_lens[num_decodes:], block_table[num_decodes:], out=out[num_decodes:],
                          max_query_len=max_query_len, num_kv_splits=num_kv_splits, **common)
        return out
    if max_query_len is None:  # host sync: the engine passes it
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    qpk = num_heads // num_kv_heads
    qpk_pad = triton.next_power_of_2(qpk)
    device_index = None  # the interpreter
    if query.is_cuda:
        device_index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    num_sms, smem_bytes = device_limits(device_index)
    cfg = default_config(query.dtype, head_dim, max_query_len, qpk_pad, key_cache.dtype, smem_bytes)
    if config:
        cfg.update(config)
    block_m = max(cfg["block_m"], qpk_pad)
    # No more query tokens per program than the longest chunk needs, and never under 16 rows.
    block_q = min(block_m // qpk_pad, triton.next_power_of_2(max(max_query_len, 1)))
    block_m = max(16, block_q * qpk_pad)
    block_q = block_m // qpk_pad
    small_m = cfg["small_m"] if cfg["small_m"] is not None else (16 if block_m >= 128 else 0)
    small_m = max(small_m, qpk_pad, 16) if small_m else 0
    small_q = small_m // qpk_pad if 0 < small_m < block_m else 0

    if num_kv_splits is None:
        if max_query_len != 1:
            num_kv_splits = 1
        else:
            if max_seq_len is None:  # host sync: the engine passes it
                max_seq_len = int(seq_lens.max())
            num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, num_sms,
                                                 cfg["tile_n"])
    if num_kv_splits < 1 or num_kv_splits & (num_kv_splits - 1):
        raise ValueError(f"num_kv_splits {num_kv_splits} must be a power of 2")
    maxnreg = cfg["maxnreg"]
    if maxnreg is not None and (type(maxnreg) is not int or maxnreg < 0):
        raise ValueError(f"config maxnreg {maxnreg!r} must be None, 0 (no cap) or registers a thread (an int)")
    if num_kv_splits > 1 and not (config and "maxnreg" in config):
        cfg["maxnreg"] = None  # the fp8 register cap cost split launches 6% (H100, 4 x 32k: 0.144 -> 0.152 ms)
    if not (config and "num_stages" in config):
        if num_kv_splits > 1:
            cfg["num_stages"] = 3  # few tiles per program: deeper prefetch hides the latency (measured, docs)
        cfg["num_stages"] = cap_stages(cfg["num_stages"], cfg["tile_n"], head_dim, key_cache.element_size(),
                                       smem_bytes)

    decode_only = max_query_len == 1
    q_programs = num_seqs if decode_only else num_tokens // block_q + num_seqs
    heads_inner = bool(cfg["heads_inner"])
    if heads_inner:
        grid = (q_programs * num_kv_heads, 1, num_kv_splits)
    else:
        grid = (q_programs, num_kv_heads, num_kv_splits)
    if num_kv_splits > 1:
        part_max = torch.empty((num_tokens, num_heads, num_kv_splits), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(
            (num_tokens, num_heads, num_kv_splits, head_dim), dtype=torch.float32, device=query.device
        )
    else:
        part_max = part_sum = part_acc = out  # unused by the kernel when NUM_SEGMENTS == 1

    _unified_attention_kernel[grid](
        out, part_max, part_sum, part_acc,
        query, key_cache, value_cache,
        query_start_loc, seq_lens, block_table,
        scale * _LOG2E,
        num_seqs,
        num_heads,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        NUM_QPK=qpk,
        QPK_PAD=qpk_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        SMALL_Q=small_q,
        SMALL_M=small_q * qpk_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=cfg["tile_n"],
        NUM_SEGMENTS=num_kv_splits,
        DECODE_ONLY=decode_only,
        IEEE=query.dtype == torch.float32 or _interpreting(),
        UPCAST=query.dtype != torch.float32 and _interpreting(),
        F16_DOT=bool(cfg["f16_dot"]) and key_cache.dtype == torch.float8_e4m3fn and query.dtype != torch.float32,
        HEADS_INNER=heads_inner,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] and not _interpreting() else {}),  # compiled code only
    )
    if num_kv_splits > 1:
        _reduce_segments_kernel[(num_tokens, num_heads)](
            out, part_max, part_sum, part_acc,
            query_start_loc,
            num_seqs,
            num_heads,
            out.stride(0), out.stride(1),
            NUM_SEGMENTS=num_kv_splits,
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out
