"""Can decode attention (bandwidth-bound) and a prefill chunk's matmuls (compute-bound) run at the same time?

The one-kernel-at-a-time bound of issue 3's benchmark is below its targets (docs/benchmarks.md); going past it
needs the two to overlap, as NanoFlow does with nano-batches on two streams. Before building that into the
engine, this measures it for one llama3-8b layer on this card:
  attention  decode attention of 256 sequences at 900 tokens of context (unified_attention, bf16)
  matmuls    one layer's matmuls (QKV, O, gate/up, down) for T prefill tokens, T in 256, 512, 1024
  serial     the two on one stream; concurrent: attention on a second stream beside the matmuls, with and
             without an SM carve-out for the matmuls (torch's cuBLAS SM carve-out, where the build has it),
             launched attention first or matmuls first (a kernel launched first takes every SM it can fill)
overlap = (attention + matmuls - concurrent) / min(attention, matmuls): 0 = none, 1 = the shorter one is free.

    PYTHONPATH=$PWD python tests/gpu/overlap_bench.py        # writes overlap_bench.json to $OUT (or out/)
"""
import datetime
import json
import os

import torch

from batchllm.kernels.attention import unified_attention

HIDDEN, INTER, H, KVH, D, BS = 4096, 14336, 32, 8, 128, 16
DT = torch.bfloat16


def timed(fn, iters=20, warmup=5) -> float:
    """Median ms of fn() between CUDA events on the current stream, the device drained around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def decode_attention(num_seqs=256, context=900):
    g = torch.Generator(device="cuda").manual_seed(0)
    per_seq = -(-context // BS)
    blocks = num_seqs * per_seq
    table = torch.randperm(blocks, device="cuda", generator=g).to(torch.int32).view(num_seqs, per_seq)
    kc = torch.randn((blocks, BS, KVH, D), device="cuda", dtype=DT, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn((num_seqs, H, D), device="cuda", dtype=DT, generator=g)
    out = torch.empty_like(q)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")

    def run():
        unified_attention(q, kc, vc, qsl, seq_lens, table, out=out, max_query_len=1, max_seq_len=context,
                          num_kv_splits=1)

    kv_bytes = 2 * num_seqs * context * KVH * D * kc.element_size()
    return run, kv_bytes


def layer_matmuls(tokens):
    g = torch.Generator(device="cuda").manual_seed(1)
    w = {name: torch.randn(shape, device="cuda", dtype=DT, generator=g) * 0.02 for name, shape in (
        ("qkv", ((H + 2 * KVH) * D, HIDDEN)), ("o", (HIDDEN, H * D)), ("gate_up", (2 * INTER, HIDDEN)),
        ("down", (HIDDEN, INTER)))}
    x = torch.randn((tokens, HIDDEN), device="cuda", dtype=DT, generator=g)
    a = torch.randn((tokens, H * D), device="cuda", dtype=DT, generator=g)
    m = torch.randn((tokens, INTER), device="cuda", dtype=DT, generator=g)

    def run():
        torch.nn.functional.linear(x, w["qkv"])
        torch.nn.functional.linear(a, w["o"])
        torch.nn.functional.linear(x, w["gate_up"])
        torch.nn.functional.linear(m, w["down"])

    flops = 2 * tokens * sum(t.numel() for t in w.values())
    return run, flops


def _carveout(sms: int) -> bool:
    """Leave `sms` SMs to other streams in cuBLAS matmuls; False where this torch has no such switch."""
    fn = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if fn is None:
        return False
    fn(sms if sms else None)
    return True


def main():
    props = torch.cuda.get_device_properties(0)
    attn, kv_bytes = decode_attention()
    side = torch.cuda.Stream()
    rows = []
    t_attn = timed(attn)
    print(f"{props.name}: decode attention 256 x 900: {t_attn:.3f} ms ({kv_bytes / t_attn / 1e6:.0f} GB/s)")
    for tokens in (256, 512, 1024):
        mm, flops = layer_matmuls(tokens)
        t_mm = timed(mm)

        def serial():
            mm()
            attn()

        def concurrent(matmuls_first: bool):
            def run():
                side.wait_stream(torch.cuda.current_stream())
                if matmuls_first:  # the matmuls take their SMs first; attention gets the carved-out ones
                    mm()
                with torch.cuda.stream(side):
                    attn()
                if not matmuls_first:
                    mm()
                torch.cuda.current_stream().wait_stream(side)
            return run

        t_serial = timed(serial)
        for carve in (0, 16, 32, 48, 66):
            if carve and not _carveout(carve):
                continue
            t_mm_carved = timed(mm)  # alone: does the carve-out reach these kernels at all?
            for first in ("attention", "matmuls"):
                t_conc = timed(concurrent(first == "matmuls"))
                row = {"tokens": tokens, "carveout_sms": carve, "first": first, "attention_ms": t_attn,
                       "matmuls_ms": t_mm, "matmuls_carved_ms": t_mm_carved, "matmul_tflops": flops / t_mm / 1e9,
                       "serial_ms": t_serial, "concurrent_ms": t_conc,
                       "overlap": (t_attn + t_mm - t_conc) / min(t_attn, t_mm)}
                rows.append(row)
                print(f"T={tokens:5d} carve-out {carve:2d} SMs, {first:9s} first: attention {t_attn:.3f} + matmuls "
                      f"{t_mm:.3f} ms ({row['matmul_tflops']:.0f} TFLOP/s; carved alone {t_mm_carved:.3f}) = "
                      f"serial {t_serial:.3f}, concurrent {t_conc:.3f} ms, overlap {row['overlap']:.2f}")
            _carveout(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "rows": rows}
    out_dir = os.environ.get("OUT") or "out"  # out/ is git-ignored
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "overlap_bench.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
