"""Is the fp8 decode bound by how V sits in the cache? A probe, not engine code.

Run on a GPU machine from the repository root:  PYTHONPATH=$PWD python tests/gpu/vlayout_bench.py [--fp8] [--prefetch | --regs | --halves]
Writes vlayout_bench.json (to $OUT when set, else the working directory).

The decode program's second MMA takes V as its B operand, [positions (K dim), head_dim (N dim)]. The engine's
cache keeps head_dim contiguous, so that operand is N-major. For 16-bit values the hardware transposes it on the
way in (ldmatrix.trans); for 8-bit values it cannot, and FlashAttention-3 transposes V in the kernel for its
fp8 path. Hypothesis: the fp8 decode (57% of an H200's copy bandwidth) pays for that transposition.

The probe is a small decode-only kernel: one program per (sequence, KV head), the query heads of a KV head
packed in a 16-row tile, fp8 K/V widened to fp16 as the engine's kernel does. It runs on two V layouts:
- "nhd": the engine's [num_blocks, block_size, num_kv_heads, head_dim];
- "hdn": [num_blocks, num_kv_heads, head_dim, block_size], so a tile's V has 16-position runs contiguous
  (the MMA's K dimension).
The engine's kernel runs on the same batch first, so the probe's nhd time says whether it is a fair stand-in.
Outputs are checked against the engine's kernel.
Session 7 added fp8 MMAs (FP8_QK, FP8_PV): the query and P rounded to e4m3, K and V fed to the MMAs unwidened,
as FlashAttention-3's fp8 path does. Prediction: if widening K/V is what bounds the fp8 decode, fp8-qk takes about
half of it away (>= 15% faster at 400 x ~900) and fp8-qk-pv more, at an error of ~1e-2 against the bf16 math.
A third probe (--prefetch) loads each tile's block numbers one iteration ahead: if the K/V loads wait on the
block-table load in the same iteration (a dependent chain the pipeliner does not hide), fp8, with half the bytes a
round trip, suffers most. Prediction then: fp8 400 x ~900 >= 10% faster, bf16 unchanged; else within 3%.
A fifth (--halves) splits head_dim in two (QK^T as two MMAs, PV into two accumulators), so no widened tile is
whole in registers. Prediction: if that lowers the registers enough for 4 programs an SM, fp8 400 x ~900 >= 5%
faster than the capped default (0.300 ms on an H100); if the compiler keeps both halves live, no change.
Prediction for the layouts: if the transposition is the bound, hdn runs the fp8 decode at 400 x ~900 at >= 75% of the copy
bandwidth (>= 25% faster than nhd); if not, within 5% of it.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))


@triton.jit
def _program_rows(num_kv_heads, stride_qt, stride_qh, NUM_QPK: tl.constexpr, QPK_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """This program's sequence and KV head, its real rows, and their offsets in the query (and out) [BLOCK_M, 1]."""
    seq = tl.program_id(0) // num_kv_heads
    kv_head = tl.program_id(0) % num_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    head_in_group = offs_m % QPK_PAD
    row_ok = (offs_m // QPK_PAD == 0) & (head_in_group < NUM_QPK)
    head = kv_head * NUM_QPK + head_in_group
    return seq, kv_head, row_ok, seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh


@triton.jit
def _to_f16(x):
    """As the engine's F16_DOT: exact for bf16 values within fp16's normal range (clamped to its max)."""
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One tile's scores into the running (max, sum): returns (p, alpha, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_probe(
    out_ptr, q_ptr, k_ptr, v_ptr, seq_lens_ptr, block_table_ptr, qk_scale, num_kv_heads,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    NUM_QPK: tl.constexpr, QPK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, V_MODE: tl.constexpr,
    FP8_QK: tl.constexpr, FP8_PV: tl.constexpr,  # fp8 MMAs: the query (QK^T) or P (PV) rounded to e4m3, no widening
    PREFETCH: tl.constexpr,  # the next tile's block numbers are loaded one iteration ahead (no dependent load chain)
):
    seq, kv_head, row_ok, rows = _program_rows(num_kv_heads, stride_qt, stride_qh, NUM_QPK, QPK_PAD, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q8 = tl.minimum(tl.maximum(q.to(tl.float32), -448.0), 448.0).to(tl.float8e4nv)
    q = _to_f16(q)
    seq_len = tl.load(seq_lens_ptr + seq)
    block_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pos0 = tl.arange(0, TILE_N)
    block_next = tl.load(block_row + pos0 // BLOCK_SIZE, mask=pos0 < seq_len, other=0).to(tl.int64)
    for tile in range(0, tl.cdiv(seq_len, TILE_N)):
        k_pos = tile * TILE_N + tl.arange(0, TILE_N)
        k_ok = k_pos < seq_len
        if PREFETCH:
            block = block_next
            n_pos = k_pos + TILE_N
            block_next = tl.load(block_row + n_pos // BLOCK_SIZE, mask=n_pos < seq_len, other=0).to(tl.int64)
        else:
            block = tl.load(block_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        in_block = (k_pos % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_head + (block * stride_kb + in_block * stride_ks)[None, :] + offs_d[:, None],
                    mask=k_ok[None, :], other=0.0)
        if FP8_QK:
            s = tl.dot(q8, k) * qk_scale
        else:
            s = tl.dot(q, k.to(tl.float16)) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        if FP8_PV:  # the engine's layout, P rounded to e4m3
            v8 = tl.load(v_head + (block * stride_vb + in_block * stride_vs)[:, None] + (offs_d * stride_vd)[None, :],
                         mask=k_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v8)
        elif V_MODE == 0:  # [positions, head_dim] as the engine loads it
            v = tl.load(v_head + (block * stride_vb + in_block * stride_vs)[:, None] + (offs_d * stride_vd)[None, :],
                        mask=k_ok[:, None], other=0.0).to(tl.float16)
        elif V_MODE == 1:  # nhd loaded as [head_dim, positions], then transposed in registers
            v_t = tl.load(v_head + (block * stride_vb + in_block * stride_vs)[None, :] + (offs_d * stride_vd)[:, None],
                          mask=k_ok[None, :], other=0.0).to(tl.float16)
            v = tl.trans(v_t)
        else:  # hdn: [head_dim, blocks, block_size] with block_size contiguous, merged to [head_dim, positions]
            offs_b = tl.arange(0, TILE_N // BLOCK_SIZE)
            offs_s = tl.arange(0, BLOCK_SIZE)
            blk = tl.load(block_row + tile * (TILE_N // BLOCK_SIZE) + offs_b, mask=tile * TILE_N + offs_b * BLOCK_SIZE < seq_len,
                          other=0).to(tl.int64)
            ok3 = (tile * TILE_N + offs_b[None, :, None] * BLOCK_SIZE + offs_s[None, None, :]) < seq_len
            v3 = tl.load(v_head + blk[None, :, None] * stride_vb + offs_d[:, None, None] * stride_vd
                         + offs_s[None, None, :], mask=ok3, other=0.0)
            v = tl.trans(tl.reshape(v3, [HEAD_DIM, TILE_N]).to(tl.float16))
        if not FP8_PV:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_probe_halves(
    out_ptr, q_ptr, k_ptr, v_ptr, seq_lens_ptr, block_table_ptr, qk_scale, num_kv_heads,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    NUM_QPK: tl.constexpr, QPK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):
    """_decode_probe with head_dim in two halves: QK^T as two MMAs over halves of K, PV into two accumulators, so
    no widened K or V tile is whole in registers at once (session 7, fifth probe: --halves)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    seq, kv_head, row_ok, rows = _program_rows(num_kv_heads, stride_qt, stride_qh, NUM_QPK, QPK_PAD, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    q_a = _to_f16(tl.load(q_ptr + rows + offs_h[None, :], mask=row_ok[:, None], other=0.0))
    q_b = _to_f16(tl.load(q_ptr + rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0))
    seq_len = tl.load(seq_lens_ptr + seq)
    block_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    for tile in range(0, tl.cdiv(seq_len, TILE_N)):
        k_pos = tile * TILE_N + tl.arange(0, TILE_N)
        k_ok = k_pos < seq_len
        block = tl.load(block_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        in_block = (k_pos % BLOCK_SIZE).to(tl.int64)
        k_rows = k_head + (block * stride_kb + in_block * stride_ks)[None, :]
        k_a = tl.load(k_rows + offs_h[:, None], mask=k_ok[None, :], other=0.0).to(tl.float16)
        s = tl.dot(q_a, k_a)
        k_b = tl.load(k_rows + HALF + offs_h[:, None], mask=k_ok[None, :], other=0.0).to(tl.float16)
        s = tl.dot(q_b, k_b, s) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        p16 = p.to(tl.float16)
        v_rows = v_head + (block * stride_vb + in_block * stride_vs)[:, None]
        v_a = tl.load(v_rows + (offs_h * stride_vd)[None, :], mask=k_ok[:, None], other=0.0).to(tl.float16)
        acc_a = acc_a * alpha[:, None] + tl.dot(p16, v_a)
        v_b = tl.load(v_rows + ((HALF + offs_h) * stride_vd)[None, :], mask=k_ok[:, None], other=0.0).to(tl.float16)
        acc_b = acc_b * alpha[:, None] + tl.dot(p16, v_b)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + rows + offs_h[None, :], (acc_a * inv[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(out_ptr + rows + HALF + offs_h[None, :], (acc_b * inv[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])

def probe(q, kc, vc, seq_lens, table, out, tile_n=128, num_warps=4, num_stages=3, v_mode=0, fp8_qk=False,
          fp8_pv=False, block_m=16, prefetch=False, maxnreg=None, halves=False):
    """vc: [num_blocks, block_size, kv_heads, head_dim] indexable (any strides). halves: _decode_probe_halves
    (the engine's V order only, no fp8 MMAs). Returns the compiled kernel (registers, spills)."""
    _, block_size, kv_heads, head_dim = kc.shape
    qpk = q.shape[1] // kv_heads
    qpk_pad = triton.next_power_of_2(qpk)
    if halves:
        kernel, variant = _decode_probe_halves, {}
    else:
        kernel, variant = _decode_probe, dict(V_MODE=v_mode, FP8_QK=fp8_qk, FP8_PV=fp8_pv, PREFETCH=prefetch)
    return kernel[(seq_lens.shape[0] * kv_heads,)](
        out, q, kc, vc, seq_lens, table, head_dim**-0.5 * 1.4426950408889634, kv_heads,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), *vc.stride(), table.stride(0),
        NUM_QPK=qpk, QPK_PAD=qpk_pad, BLOCK_M=max(block_m, qpk_pad), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE_N=tile_n, num_warps=num_warps, num_stages=num_stages, **variant,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )

def main():
    import kernel_bench as kb
    from layout_bench import copy_bandwidth

    from batchllm.kernels.attention import unified_attention

    out_dir = os.environ.get("OUT") or "."
    meta = {"device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
            "triton": triton.__version__}
    print(json.dumps(meta), flush=True)
    copy_bw = copy_bandwidth()
    cases = [("400x900", [1] * 400, kb.ctx900()),
             ("256x4096", [1] * 256, [4095] * 256)]
    dtypes = ((torch.float8_e4m3fn, "fp8"), (torch.bfloat16, "bf16"))
    if "--fp8" in sys.argv:  # the fp8 cache only
        dtypes = dtypes[:1]
    for kv_dt, tag in dtypes:
        for name, q_lens, ctx in cases:
            args, hints, nbytes = kb.batch(q_lens, ctx, seed=4, kv_dt=kv_dt)
            q, kc, vc, qsl, sl, table = args
            vc_hdn = vc.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, position-fastest
            ref = unified_attention(*args, **hints)
            label = f"{tag} decode {name}"
            kb.record(f"{label} engine kernel", kb.bench(lambda: unified_attention(*args, out=ref, **hints)),
                      nbytes, copy_bw=copy_bw)
            out = torch.empty_like(q)
            variants = [("nhd", vc, {}), ("nhd-trans", vc, {"v_mode": 1}), ("hdn-3d", vc_hdn, {"v_mode": 2})]
            if "--halves" in sys.argv:  # session 7, fifth probe: head_dim in halves (fewer live registers)
                variants = [("nhd", vc, {}), ("nhd cap 168", vc, {"maxnreg": 168}),
                            ("halves", vc, {"halves": True}), ("halves cap 128", vc, {"halves": True, "maxnreg": 128}),
                            ("halves cap 168", vc, {"halves": True, "maxnreg": 168})]
            elif "--regs" in sys.argv:  # session 7, fourth probe: registers (ncu: fp8 decode holds 208 a thread)
                variants = [(f"nhd maxnreg {r}" if r else "nhd", vc, {"maxnreg": r}) for r in (None, 168, 128)]
            elif "--prefetch" in sys.argv:  # session 7, third probe: the block numbers one tile ahead
                variants = [variants[0], ("nhd prefetch", vc, {"prefetch": True})]
            elif kv_dt == torch.float8_e4m3fn:
                variants = [variants[0]] + [
                    (f"fp8-{what}{' m64' if bm == 64 else ''}", vc, {"fp8_qk": True, "fp8_pv": what == "qk-pv",
                                                                   "block_m": bm})
                    for what in ("qk", "qk-pv") for bm in (16, 64)]
            for vname, v, kw in variants:
                shapes = ((128, 4, 3), (128, 4, 4), (64, 4, 3))
                if "--regs" in sys.argv:
                    shapes += ((64, 4, 4), (128, 8, 3))
                for tile_n, warps, stages in shapes:
                    try:
                        run = lambda v=v, t=tile_n, w=warps, s=stages, kw=kw: probe(  # noqa: E731
                            q, kc, v, sl, table, out, t, w, s, **kw)
                        compiled = run()
                        ms = kb.bench(run)
                    except Exception as e:  # a variant Triton cannot compile here: say so and go on
                        kb.record(f"{label} probe {vname} {tile_n}/{warps}/{stages} FAILED", 0.0, error=str(e)[:300])
                        continue
                    kb.record(f"{label} probe {vname} {tile_n}/{warps}/{stages}", ms, nbytes, copy_bw=copy_bw,
                              err=kb.rel_err(out, ref), regs=getattr(compiled, "n_regs", None),
                              spills=getattr(compiled, "n_spills", None))
            del args, q, kc, vc, vc_hdn
            torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "vlayout_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": kb.ROWS}, f, indent=1, default=str)
    print(f"{'case':<44} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'err':>9} regs spills")
    for r in kb.ROWS:
        print(f"{r['name']:<44} {r['ms']:>8.4f} {r.get('GB/s', 0):>7.0f} {r.get('%copy', 0):>6.1f} "
              f"{r.get('err', 0):>9.2e} {r.get('regs')} {r.get('spills')}")


if __name__ == "__main__":
    main()
