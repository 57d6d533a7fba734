"""Can decode attention (bandwidth-bound) and a prefill chunk's matmuls (compute-bound) run at the same time?

The one-kernel-at-a-time bound of issue 3's benchmark is below its targets (docs/benchmarks.md); going past it
needs the two to overlap, as NanoFlow does with nano-batches on two streams. Before building that into the
engine, this measures it for one llama3-8b layer on this card:
  attention  decode attention of 256 sequences at 900 tokens of context (unified_attention, bf16)
  matmuls    one layer's matmuls (QKV, O, gate/up, down) for T prefill tokens, T in 256, 512, 1024
  serial     the two on one stream; concurrent: attention on a second stream beside the matmuls, with and
             without an SM carve-out for the matmuls (torch's cuBLAS SM carve-out, where the build has it),
             launched attention first or matmuls first (a kernel launched first takes every SM it can fill)
  SM-limited the same matmuls through a persistent Triton GEMM whose grid is the SMs it may hold (132..80),
             launched first, attention beside it on the SMs left (NanoFlow's way of sharing the card)
overlap = (attention + matmuls - concurrent) / min(attention, matmuls): 0 = none, 1 = the shorter one is free.

    PYTHONPATH=$PWD python tests/gpu/overlap_bench.py        # writes overlap_bench.json to $OUT (or out/)
"""
import datetime

import torch
import triton
import triton.language as tl

from batchllm.kernels.attention import unified_attention
from results import write_result  # tests/gpu/results.py, beside this script

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


LAYER_SHAPES = {"qkv": ((H + 2 * KVH) * D, HIDDEN), "o": (HIDDEN, H * D), "gate_up": (2 * INTER, HIDDEN),
                "down": (HIDDEN, INTER)}  # one llama3-8b layer's weights, [out, in]


def layer_matmuls(tokens):
    g = torch.Generator(device="cuda").manual_seed(1)
    w = {name: torch.randn(shape, device="cuda", dtype=DT, generator=g) * 0.02 for name, shape in LAYER_SHAPES.items()}
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


@triton.jit
def _persistent_matmul(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[M, N] = x[M, K] @ w[N, K]^T, row-major, M, N, K multiples of the blocks. A fixed number of programs
    (the grid) walks the output tiles with a stride, so the kernel holds as many SMs as its grid, no more."""
    tiles_n = N // BN
    num_tiles = (M // BM) * tiles_n
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        rm = (tile // tiles_n) * BM + tl.arange(0, BM)
        rn = (tile % tiles_n) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(w_ptr + rn[:, None] * K + (k + rk)[None, :])
            acc = tl.dot(a, tl.trans(b), acc)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty))


def sm_limited_matmuls(tokens, programs):
    """One layer's matmuls (as layer_matmuls) through _persistent_matmul on `programs` SMs."""
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = LAYER_SHAPES.values()
    w = [torch.randn(shape, device="cuda", dtype=DT, generator=g) * 0.02 for shape in shapes]
    xs = [torch.randn((tokens, shape[1]), device="cuda", dtype=DT, generator=g) for shape in shapes]
    ys = [torch.empty((tokens, shape[0]), device="cuda", dtype=DT) for shape in shapes]

    def run():
        for x, wt, y in zip(xs, w, ys):
            n, k = wt.shape
            _persistent_matmul[(programs,)](x, wt, y, tokens, n, k, BM=128, BN=128, BK=64, num_warps=8,
                                            num_stages=3)

    run()
    refs = [torch.nn.functional.linear(x, wt).float() for x, wt in zip(xs, w)]
    err = max(float((y.float() - ref).abs().max() / ref.abs().max()) for y, ref in zip(ys, refs))
    return run, err


def side_by_side(mm, attn, side: torch.cuda.Stream, matmuls_first: bool):
    """mm on the current stream and attn on `side`, launched in that order or the other (a kernel launched
    first takes every SM it can fill; a carve-out leaves the rest to attention)."""
    def run():
        side.wait_stream(torch.cuda.current_stream())
        if matmuls_first:
            mm()
        with torch.cuda.stream(side):
            attn()
        if not matmuls_first:
            mm()
        torch.cuda.current_stream().wait_stream(side)
    return run


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

        t_serial = timed(serial)
        for carve in (0, 16, 32, 48, 66):
            if carve and not _carveout(carve):
                continue
            t_mm_carved = timed(mm)  # alone: does the carve-out reach these kernels at all?
            for first in ("attention", "matmuls"):
                t_conc = timed(side_by_side(mm, attn, side, matmuls_first=first == "matmuls"))
                row = {"tokens": tokens, "carveout_sms": carve, "first": first, "attention_ms": t_attn,
                       "matmuls_ms": t_mm, "matmuls_carved_ms": t_mm_carved, "matmul_tflops": flops / t_mm / 1e9,
                       "serial_ms": t_serial, "concurrent_ms": t_conc,
                       "overlap": (t_attn + t_mm - t_conc) / min(t_attn, t_mm)}
                rows.append(row)
                print(f"T={tokens:5d} carve-out {carve:2d} SMs, {first:9s} first: attention {t_attn:.3f} + matmuls "
                      f"{t_mm:.3f} ms ({row['matmul_tflops']:.0f} TFLOP/s; carved alone {t_mm_carved:.3f}) = "
                      f"serial {t_serial:.3f}, concurrent {t_conc:.3f} ms, overlap {row['overlap']:.2f}")
            _carveout(0)
    # The same question with matmuls of our own that hold only `programs` SMs (a persistent Triton kernel),
    # launched first; attention on the side stream gets the SMs they leave.
    split_rows = []
    for tokens in (256, 1024):
        mm_blas, _ = layer_matmuls(tokens)
        t_blas = timed(mm_blas)
        for programs in (props.multi_processor_count, 112, 96, 80):
            mm, err = sm_limited_matmuls(tokens, programs)
            t_mm = timed(mm)
            t_conc = timed(side_by_side(mm, attn, side, matmuls_first=True))
            row = {"tokens": tokens, "programs": programs, "matmuls_ms": t_mm, "cublas_matmuls_ms": t_blas,
                   "attention_ms": t_attn, "concurrent_ms": t_conc, "max_rel_err": err,
                   "overlap": (t_attn + t_mm - t_conc) / min(t_attn, t_mm),
                   "gain_vs_cublas_serial": (t_attn + t_blas) / t_conc}
            split_rows.append(row)
            print(f"T={tokens:5d} Triton matmuls on {programs:3d} SMs: {t_mm:.3f} ms (cuBLAS {t_blas:.3f}; rel err "
                  f"{err:.1e}), + attention {t_attn:.3f} -> concurrent {t_conc:.3f} ms, overlap {row['overlap']:.2f}, "
                  f"cuBLAS serial / this {row['gain_vs_cublas_serial']:.2f}x")
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "rows": rows, "sm_split": split_rows}
    write_result("overlap_bench.json", result)


if __name__ == "__main__":
    main()
