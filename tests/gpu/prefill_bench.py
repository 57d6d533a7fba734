"""Prefill attention: unified_attention on long chunks over a sweep of tile shapes, against torch's dense
causal SDPA (flash) on the same tokens as a reference ceiling.

Run on a GPU machine from the repository root:  PYTHONPATH=$PWD python tests/gpu/prefill_bench.py
(PREFILL_CAPS=1: the default tiles under register caps instead of the tile sweep)
Writes prefill_bench.json (to $OUT when set, else the working directory). llama3-8b's heads: 32 query, 8 KV,
head_dim 128, bf16, paged blocks of 16. TFLOP/s count the causal QK^T and PV work (kernel_bench.attn_flops).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import kernel_bench as kb  # noqa: E402

CASES = {  # name: (query lens, context lens)
    "1x8000": ([8000], [0]),
    "4x2048": ([2048] * 4, [0] * 4),
    "16x512": ([512] * 16, [0] * 16),  # the benchmark's prompts: 100..1024 tokens
    "8x512 over 1-4k": ([512] * 8, [1024, 1536, 2048, 2560, 3072, 3584, 4096, 1024]),
}
VARIANTS = [("default", {})] + [
    (f"m{m}/n{n}/w{w}/s{s}", {"config": {"block_m": m, "tile_n": n, "num_warps": w, "num_stages": s, "small_m": 0}})
    for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
] + [("m128/n32/w4/s2 small16", {"config": {"block_m": 128, "tile_n": 32, "num_warps": 4, "num_stages": 2,
                                             "small_m": 16}})]
FP8_CASES = {"16x512 fp8": CASES["16x512"], "8x512 over 1-4k fp8": CASES["8x512 over 1-4k"]}
FP8_VARIANTS = [("default", {})] + [
    (f"m{m}/n{n}/w{w}/s{s}", {"config": {"block_m": m, "tile_n": n, "num_warps": w, "num_stages": s, "small_m": 0}})
    for m, n, w, s in ((64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 4, 2), (128, 64, 4, 2), (128, 32, 8, 2),
                       (128, 64, 8, 2), (128, 64, 4, 3))
]

if os.environ.get("PREFILL_CAPS"):  # session 7: the defaults under register caps (maxnreg) instead of the tile sweep
    VARIANTS = FP8_VARIANTS = [("default", {})] + [(f"default cap {r}", {"config": {"maxnreg": r}})
                                                   for r in (128, 168, 200, 232)]


def sdpa_ms(q_lens, ctx):
    """Dense causal flash attention over the same shapes (no paging, no prefix): a ceiling, not a peer."""
    if any(ctx):
        return None
    ms = 0.0
    for n in sorted(set(q_lens)):
        b = q_lens.count(n)
        q = torch.randn(b, kb.H, n, kb.D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, kb.KVH, n, kb.D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms += kb.bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    return ms


def main():
    out_dir = os.environ.get("OUT") or "."
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "torch": torch.__version__, "argv": sys.argv}
    print(json.dumps(meta), flush=True)
    kb.BS = 16
    for label, (q_lens, ctx) in CASES.items():
        flops = kb.attn_flops(q_lens, ctx)
        ref = sdpa_ms(q_lens, ctx)
        if ref:
            kb.record(f"{label} torch sdpa (dense)", ref, flops=flops)
        args, hints, _ = kb.batch(q_lens, ctx, seed=5, kv_dt=torch.bfloat16)
        kb.sweep(label, args, hints, None, flops, None, VARIANTS)
        del args
        torch.cuda.empty_cache()
    for label, (q_lens, ctx) in FP8_CASES.items():
        args, hints, _ = kb.batch(q_lens, ctx, seed=5, kv_dt=torch.float8_e4m3fn)
        kb.sweep(label, args, hints, None, kb.attn_flops(q_lens, ctx), None, FP8_VARIANTS)
        del args
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "prefill_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": kb.ROWS}, f, indent=1, default=str)
    for r in kb.ROWS:
        if "default" in r["name"] or "BEST" in r["name"] or "sdpa" in r["name"] or "m128/n32/w4/s2" in r["name"]:
            print(f"{r['name']:<44} {r['ms']:>8.3f} ms {r.get('TFLOP/s', 0):>6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
