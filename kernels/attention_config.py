"""How a unified_attention launch is shaped: tile sizes, split-KV segments and pipeline stages, from the batch and
the card. kernels/attention.py launches with them; docs/kernels.md has the measurements behind each default.
"""
import functools

import torch

_H100 = (132, 232448)  # (SMs, shared memory a program may use): what the interpreter pretends to be


@functools.lru_cache(maxsize=None)
def device_limits(device_index) -> tuple[int, int]:
    """(SMs, opt-in shared memory a program may use) of a CUDA device: 132 and 227 KB on an H100, 99 KB on
    Ada (the L4, L40S). device_index None (the interpreter): an H100's, so the rules are the same."""
    if device_index is None or not torch.cuda.is_available():
        return _H100
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", _H100[1])


def choose_num_kv_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, num_sms, tile_n=64):
    """Split-KV segments for a batch: 1 (no split) unless it is decode-only, has too few
    (sequence, KV head) programs to fill the GPU, and its longest sequence has tiles to spare.
    Then the smallest power of 2 giving about two programs per SM, keeping >= 4 tiles a segment."""
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= num_sms:
        return 1
    splits = 1
    while programs * splits < 2 * num_sms and splits < 64:
        splits *= 2
    while splits > 1 and max_seq_len < 4 * tile_n * splits:
        splits //= 2
    return splits


def cap_stages(num_stages, tile_n, head_dim, kv_element_size, smem_bytes):
    """No more K/V tiles in flight than shared memory holds (3 fp8 stages of 128 positions take 96 KB; Ada gives
    a program 99 KB), and never under 2."""
    stage_bytes = 2 * tile_n * head_dim * kv_element_size
    return max(2, min(num_stages, (smem_bytes - (24 << 10)) // stage_bytes))


def default_config(dtype, head_dim, max_query_len, qpk_pad, kv_dtype=None, smem_bytes=_H100[1]):
    """Tile shapes and launch settings for one launch (override with unified_attention's config=).

    block_m: rows per program for prefill chunks; small_m: the row tile a program with few tokens left
    (decode rows, chunk tails) switches to inside the same launch (0: never; None: 16 when block_m >= 128,
    where it paid on an H200 (mixed batch 1.99 -> 1.43 ms), else 0, where it cost ~2%: docs/kernels.md).
    Prefill launches at head_dim 128 take 128 rows and no small tile (below): decode rows have their own
    launch now, and the small tile cost 5-12% on chunks alone.
    An fp8 cache: K/V widened to fp16 with the query (f16_dot: one conversion instruction for two values, not
    bf16's longer way). Decoding from it also takes twice the positions a tile (tile_n, the same bytes in
    flight) and a third pipeline stage. On an H100, decode 256 x 4096: 63% -> 84% of copy bandwidth; prefill
    chunks 0.99 -> 0.90 ms with f16_dot, and tile_n 128 was 13% slower there (docs/kernels.md).
    maxnreg: a cap on registers a thread (None or 0: the compiler's choice). Decoding from an fp8 cache at
    head_dim 128 the compiler takes 205-208 registers, room for 2 programs an SM: Nsight Compute on an H100 read
    12.5% occupancy and DRAM 69% busy, a latency bound. At 168, 3 programs fit (the probe spilled 2 bytes):
    decode 400 x ~900 0.328 -> 0.309 ms on an H100, 0.304 -> 0.275 on an H200; llama3-8b with an fp8 KV cache
    +1.5-2.1% (docs/benchmarks.md T59-T65). Split-KV launches go without it (unified_attention): there it cost
    6%. A config= override applies to both launches of a mixed batch; prefill launches lose under any cap (T64).
    heads_inner: programs ordered KV-head-fastest, so a sequence's heads run side by side and read each cache
    position's heads (adjacent in memory) together. On an H200: 1-4% off decode and mixed launches, bf16 and
    fp8 (tests/gpu/layout_bench.py, docs/kernels.md).
    """
    wide = dtype == torch.float32 or head_dim > 128
    fp8 = kv_dtype == torch.float8_e4m3fn
    fp8_decode = fp8 and max_query_len <= 1
    cfg = {
        "block_m": 16 if max_query_len <= 1 else 64,
        "small_m": None,
        "tile_n": (32 if wide else 64) * (2 if fp8_decode else 1),
        "f16_dot": fp8,
        "num_warps": 4,
        "num_stages": 3 if fp8_decode else 2,
        "heads_inner": True,
        "maxnreg": None,
    }
    if fp8_decode and head_dim == 128 and not wide and smem_bytes >= 200 << 10:  # measured on H100 and H200 (above)
        cfg["maxnreg"] = 168
    # Prefill launches at the measured head size, on the measured cards (Hopper's 227 KB of shared memory; the
    # interpreter counts as one). Elsewhere 128 rows are untried: offline compiles spill more registers on Ada
    # (~0.8 KB with an fp8 cache) and Ampere, so they keep 64.
    if max_query_len > 1 and head_dim == 128 and smem_bytes >= 200 << 10:
        # 128 rows a program (32 tokens x 4 heads at GQA 4), no small tile: with the unmasked loop, bf16 on an
        # H200 took 16 x 512 chunks 0.191 -> 0.168 ms, 4 x 2048 0.482 -> 0.447, 8k 1.574 -> 1.515 (tile_n 32);
        # an fp8 cache 0.203 -> 0.193 and chunks over cached prefixes 0.659 -> 0.624 (tile_n 64, 3 stages).
        cfg.update(block_m=128, small_m=0, tile_n=64 if fp8 else 32, num_stages=3 if fp8 else 2)
    return cfg
