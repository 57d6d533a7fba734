"""Does the order K/V bytes are read in matter? Decode and mixed attention under three ways of laying the work out.

Run on a GPU machine from the repository root:  PYTHONPATH=$PWD python tests/gpu/layout_bench.py
Writes layout_bench.json (to $OUT when set, else the working directory).

- nhd: the engine's cache, [num_blocks, block_size, num_kv_heads, head_dim]; one program per (sequence, KV head),
  programs ordered sequence-fastest, so the 8 heads of one position (8 x 128 B in fp8) are read by programs a
  whole wave apart.
- nhd heads-inner: the same cache, programs ordered head-fastest (config heads_inner): a sequence's heads run
  side by side and read each position's heads together.
- hnd: a head-major cache, [num_blocks, num_kv_heads, block_size, head_dim], passed as a permuted view: a
  program reads 16 positions of its head as one contiguous run (2 KB in fp8).
Every variant's output is checked against nhd's (the same arithmetic, so it must agree to rounding).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_bench as kb  # noqa: E402

from batchllm.kernels.attention import unified_attention  # noqa: E402


def variants(args):
    q, kc, vc = args[:3]
    hnd_k = kc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, head-major in memory
    hnd_v = vc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    hnd = (q, hnd_k, hnd_v) + tuple(args[3:])
    inner = {"config": {"heads_inner": True}}
    return [("nhd", args, {}), ("nhd heads-inner", args, inner), ("hnd", hnd, {}), ("hnd heads-inner", hnd, inner)]


def run(label, args, hints, nbytes, copy_bw, extra=None):
    out = torch.empty_like(args[0])
    ref = None
    for name, a, kw in variants(args):
        kw = {**kw, **(extra or {})}
        ms = kb.bench(lambda a=a, kw=kw: unified_attention(*a, out=out, **hints, **kw))
        if ref is None:
            ref = out.clone()
        row = kb.record(f"{label} {name}", ms, nbytes, copy_bw=copy_bw, err=kb.rel_err(out, ref))
        assert row["err"] < 1e-3, row
    torch.cuda.empty_cache()


def copy_bandwidth():
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return kb.record("copy 1GiB", kb.bench(lambda: dst.copy_(src)), 4 * src.numel(), summary=True)["GB/s"]


def main():
    out_dir = os.environ.get("OUT") or "."
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "torch": torch.__version__, "argv": sys.argv}
    print(json.dumps(meta), flush=True)
    copy_bw = copy_bandwidth()
    ctx900 = kb.ctx900()
    g = torch.Generator().manual_seed(2)
    mixed_q = [1] * 192 + [512] * 8
    mixed_ctx = torch.randint(2048, 4097, (192,), generator=g).tolist() + torch.randint(1024, 4097, (8,), generator=g).tolist()
    for kv_dt, tag in ((torch.bfloat16, "bf16"), (torch.float8_e4m3fn, "fp8")):
        for bs in (16, 32):
            kb.BS = bs
            args, hints, nbytes = kb.batch([1] * 400, ctx900, seed=4, kv_dt=kv_dt)
            run(f"{tag} bs{bs} decode 400x900", args, hints, nbytes, copy_bw)
            del args
        kb.BS = 16
        args, hints, nbytes = kb.batch([1] * 256, [4095] * 256, seed=0, kv_dt=kv_dt)
        run(f"{tag} decode 256x4096", args, hints, nbytes, copy_bw)
        del args
        args, hints, nbytes = kb.batch(mixed_q, mixed_ctx, seed=2, kv_dt=kv_dt)
        run(f"{tag} mixed 192x1+8x512", args, hints, nbytes, copy_bw, {"num_decodes": 192})
        del args
    with open(os.path.join(out_dir, "layout_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": kb.ROWS}, f, indent=1, default=str)
    print(f"{'case':<44} {'ms':>8} {'GB/s':>7} {'%copy':>6}")
    for r in kb.ROWS:
        print(f"{r['name']:<44} {r['ms']:>8.4f} {r.get('GB/s', 0):>7.0f} {r.get('%copy', 0):>6.1f}")


if __name__ == "__main__":
    main()
