"""AWQ matmuls (kernels/awq.py) against dense bf16 ones (cuBLAS through F.linear) on llama3-8b's shapes.

For each batch size M: one layer's four matmuls (qkv, o, gate_up, down; 4-bit weights in groups of 128) timed
through the fused kernel with the default tiles (`awq.config`) and with each of a few alternatives, the best
kept; dequantized to bf16 then multiplied by cuBLAS; through `awq_matmul` (which picks one of the two); the dense
bf16 matmuls of the same shapes; and what the fused kernel reaches: bandwidth (weight bytes / time), TFLOP/s.

    PYTHONPATH=$PWD python tests/gpu/awq_bench.py      # writes awq_bench.json to $OUT (or out/)
"""
import datetime

import torch
from torch.nn import functional as F

from batchllm.bench_roofline import measure_peaks
from batchllm.kernels import awq
from results import write_result  # tests/gpu/results.py, beside this script

HIDDEN, INTER, QKV = 4096, 14336, 6144
SHAPES = {"qkv": (HIDDEN, QKV), "o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}
GROUP, DT = 128, torch.bfloat16
TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 32, 128, 2, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 256, 64, 8, 4),
    (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 4, 4),
]


def timed(fn, reps=10) -> float:
    """Median ms of one call, from 5 replays of a CUDA graph of `reps` calls (as the engine runs its steps: the
    launch cost of a Triton kernel from Python would otherwise be most of what a small matmul measures)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def alternatives(m, n, k):
    """Every tile of TILES that fits M, without a K split and with ~2, ~4 and ~8 programs an SM."""
    out = []
    for bm, bn, bk, warps, stages in TILES:
        if bm > max(16, 2 * m):
            continue
        tiles = -(-m // bm) * -(-n // bn)
        for split in {1, *(max(1, min(k // bk, 32, per_sm * 132 // tiles)) for per_sm in (2, 4, 8))}:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, SPLIT_K=split))
    return out


def main():
    peaks = measure_peaks(torch.device("cuda"), DT)
    print(f"{torch.cuda.get_device_name()}: peaks {peaks['peak_tflops']:.0f} TFLOP/s, {peaks['peak_bw_gbs']:.0f} GB/s",
          flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, (k, n) in SHAPES.items():
        qw = torch.randint(-2**31, 2**31 - 1, (k, n // 8), device="cuda", generator=gen, dtype=torch.int64).int()
        qz = torch.full((k // GROUP, n // 8), 0x88888888 - 2**32, dtype=torch.int32, device="cuda")
        s = torch.full((k // GROUP, n), 0.004, dtype=DT, device="cuda")
        weights[name] = (qw, qz, s, torch.randn(n, k, device="cuda", dtype=DT) * 0.02)
    rows = []
    for m in (1, 16, 32, 64, 128, 256, 1024, 4096):
        row = {"m": m, "shapes": {}}
        for name, (k, n) in SHAPES.items():
            qw, qz, s, dense = weights[name]
            x = torch.randn(m, k, device="cuda", dtype=DT)
            t_default = timed(lambda: awq.awq_gemm(x, qw, qz, s), reps=10)
            best, best_cfg = t_default, "default"
            for cfg in alternatives(m, n, k) if m <= 128 else []:  # the fused kernel's range (and a bit more)
                try:
                    t = timed(lambda: awq.awq_gemm(x, qw, qz, s, cfg=cfg), reps=10)
                except Exception as e:  # noqa: BLE001 (a tile that needs more shared memory than the card has)
                    if "OutOfResources" not in type(e).__name__:
                        raise
                    continue
                if t < best:
                    best, best_cfg = t, cfg
            t_dense = timed(lambda: F.linear(x, dense), reps=10)
            t_dequant = timed(lambda: x @ awq.awq_dequantize(qw, qz, s, DT), reps=10)
            flops = 2 * m * n * k
            t_matmul = timed(lambda: awq.awq_matmul(x, qw, qz, s))
            row["shapes"][name] = {"awq_ms": t_default, "awq_best_ms": best, "best_cfg": best_cfg,
                                   "dequant_matmul_ms": t_dequant, "matmul_ms": t_matmul,
                                   "default_cfg": awq.config(m, n, k, GROUP), "dense_ms": t_dense,
                                   "awq_gbs": k * n / 2 / t_default / 1e6, "awq_tflops": flops / t_default / 1e9,
                                   "dense_tflops": flops / t_dense / 1e9}
        for key in ("awq_ms", "awq_best_ms", "dense_ms", "dequant_matmul_ms", "matmul_ms"):
            row[key] = sum(v[key] for v in row["shapes"].values())
        print(f"M {m:5d}: layer's matmuls, ms: fused {row['awq_ms']:.3f} (best tiles {row['awq_best_ms']:.3f}), "
              f"dequantized + cuBLAS {row['dequant_matmul_ms']:.3f}, awq_matmul {row['matmul_ms']:.3f}; dense bf16 "
              f"{row['dense_ms']:.3f}", flush=True)
        for name, v in row["shapes"].items():
            print(f"    {name:8s} awq {v['awq_ms']:.4f} ({v['awq_gbs']:.0f} GB/s, {v['awq_tflops']:.0f} TFLOP/s) "
                  f"best {v['awq_best_ms']:.4f} {v['best_cfg']}; dense {v['dense_ms']:.4f} ({v['dense_tflops']:.0f})",
                  flush=True)
        rows.append(row)
    write_result("awq_bench.json", {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                                    "torch": torch.__version__, "peaks": peaks, "rows": rows})


if __name__ == "__main__":
    main()
