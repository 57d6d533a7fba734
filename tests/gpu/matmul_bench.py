"""How close do a decode step's matmuls come to their bound, and does another cuBLAS path do better?

A llama3-8b decode step of ~260 rows sits at the H100's ridge point: its matmuls read 16 GB of weights (5.3 ms)
and do as many FLOPs as the card does in about as long. The step profile (docs/benchmarks.md) shows them at
~7 ms. This times one layer's four matmuls and the lm_head at decode batch sizes, three ways:
  lt      F.linear through cuBLASLt (torch's default for bf16): x @ W^T
  cublas  the same through the classic cuBLAS path (torch.backends.cuda.preferred_blas_library)
  nn      x @ W with W stored transposed ([in, out]) through cuBLASLt: another kernel family
and reports each shape's time against max(FLOPs / peak, bytes / bandwidth), with the peaks measured here.

    PYTHONPATH=$PWD python tests/gpu/matmul_bench.py      # writes matmul_bench.json to $OUT (or out/)
"""
import datetime

import torch
from torch.nn import functional as F

from batchllm.bench_roofline import measure_peaks
from results import write_result  # tests/gpu/results.py, beside this script

HIDDEN, INTER, QKV, VOCAB, LAYERS = 4096, 14336, 6144, 128256, 32
SHAPES = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER),
          "lm_head": (VOCAB, HIDDEN)}
DT = torch.bfloat16


def timed(fn, reps=20) -> float:
    """Median ms of one call, from 5 runs of `reps` calls between CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def main():
    peaks = measure_peaks(torch.device("cuda"), DT)
    flops_s, bw = peaks["peak_tflops"] * 1e12, peaks["peak_bw_gbs"] * 1e9
    weights = {k: torch.randn(s, device="cuda", dtype=DT) * 0.02 for k, s in SHAPES.items()}
    weights_t = {k: w.t().contiguous() for k, w in weights.items()}
    rows = []
    print(f"{torch.cuda.get_device_name()}: peaks {peaks['peak_tflops']:.0f} TFLOP/s, {peaks['peak_bw_gbs']:.0f} GB/s")
    for m in (64, 128, 256, 264, 320, 424, 512):
        step = {"lt": 0.0, "cublas": 0.0, "nn": 0.0, "bound": 0.0}
        for name, (n, k) in SHAPES.items():
            x = torch.randn((m, k), device="cuda", dtype=DT)
            w, wt = weights[name], weights_t[name]
            bound = max(2 * m * n * k / flops_s, (n * k + m * (n + k)) * 2 / bw) * 1e3
            t = {}
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t["lt"] = timed(lambda: F.linear(x, w))
            t["nn"] = timed(lambda: torch.matmul(x, wt))
            torch.backends.cuda.preferred_blas_library("cublas")
            t["cublas"] = timed(lambda: F.linear(x, w))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            times = 1 if name == "lm_head" else LAYERS
            for key in t:
                step[key] += t[key] * times
            step["bound"] += bound * times
            rows.append({"m": m, "matmul": name, "bound_ms": bound, **{f"{key}_ms": v for key, v in t.items()}})
            print(f"M={m:4d} {name:8s} bound {bound:.4f} ms | lt {t['lt']:.4f} cublas {t['cublas']:.4f} "
                  f"nn {t['nn']:.4f} ms | best/bound {min(t.values()) / bound:.2f}")
        rows.append({"m": m, "matmul": "step", **{f"{key}_ms": v for key, v in step.items()}})
        print(f"M={m:4d} a decode step's matmuls: bound {step['bound']:.2f} ms | lt {step['lt']:.2f} "
              f"cublas {step['cublas']:.2f} nn {step['nn']:.2f} ms")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **peaks,
              "date": datetime.date.today().isoformat(), "rows": rows}
    write_result("matmul_bench.json", result)


if __name__ == "__main__":
    main()
