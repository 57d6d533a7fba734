"""The benchmark's hardware side: peaks measured on the card, and a per-step roofline for a workload.

    peaks = measure_peaks(torch.device("cuda"), torch.bfloat16)   # {"peak_tflops", "peak_bw_gbs", ...}
    shape = ModelShape.from_llm(llm)
    est = roofline(shape, timer.steps, peaks, elapsed_s)

Peaks: a large matmul in the engine's dtype (8192^3 on CUDA, 2048^3 on the CPU) for FLOP/s, and a large
device-to-device copy (bytes read + written / time) for bandwidth. Measured in the same process as the
benchmark, so the estimate is for this card, this clock and this load.

The model of one step: time = max(FLOPs / peak FLOP/s, bytes / peak bandwidth), where
  FLOPs = 2 * dense params * tokens + 2 * hidden * vocab * sampled rows + attention FLOPs
          (4 * layers * heads * head_dim per query-key pair, causal: a query at position p sees p + 1 keys)
  bytes = the weights once (dense + lm_head) + for each sequence its K/V context read and its new K/V written.
The workload's roofline time is the sum over the engine's actual steps; efficiency = roofline time /
measured time (1.0 = at the hardware limit). Activations, the embedding gather and the sampler are left out.

max() over a whole step assumes its bandwidth-bound attention overlaps its compute-bound matmuls. An engine that
runs one kernel at a time (batchllm today, vLLM) cannot do that; its bound is the "serial" roofline, per step
  max(matmul FLOPs / peak, weight bytes / bandwidth) + max(attention FLOPs / peak, K/V bytes / bandwidth).
Both are reported; `efficiency` is against the first. A third figure, the serial floor, is the serial bound
with the weights' reads left out, as in steps large enough to be compute-bound: no batch size or schedule
gets a one-kernel-at-a-time engine under it (the workload's FLOPs at peak, then its K/V at bandwidth).
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.layers.linear import MergedLinear


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, iters: int, warmup: int = 2) -> float:
    """The fastest of `iters` timed calls, in seconds (the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: torch.device, dtype: torch.dtype, matmul_n: int | None = None,
                  copy_bytes: int | None = None, fp8: bool = False) -> dict:
    """Peak matmul FLOP/s and copy bandwidth on `device`, measured now. Frees what it allocates.
    fp8: peak_tflops is the engine's fp8 matmul (quantization="fp8": e4m3 inputs, fp32 scales, `dtype` out), and
    peak_tflops_dtype the `dtype` one, which the lm_head and attention still run at."""
    cuda = device.type == "cuda"
    n = matmul_n or (8192 if cuda else 2048)
    nbytes = copy_bytes or ((2 << 30) if cuda else (256 << 20))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t_mm = _best_time(lambda: torch.matmul(a, b, out=c), device, iters=10 if cuda else 3)
    extra = {}
    if fp8:
        extra["peak_tflops_dtype"] = 2 * n**3 / t_mm / 1e12
        c = None
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # b column-major, as _scaled_mm wants
        sa = torch.ones(n, 1, device=device)
        sb = torch.ones(1, n, device=device)
        t_mm = _best_time(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=dtype), device,
                          iters=10 if cuda else 3)
    a = b = c = None  # free before the copy buffers
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t_cp = _best_time(lambda: dst.copy_(src), device, iters=10 if cuda else 3)
    src = dst = None
    if cuda:
        torch.cuda.empty_cache()
    return {
        "peak_tflops": 2 * n**3 / t_mm / 1e12,
        "peak_bw_gbs": 2 * nbytes / t_cp / 1e9,
        "matmul_n": n, "matmul_dtype": "float8_e4m3fn" if fp8 else str(dtype).replace("torch.", ""),
        "copy_bytes": nbytes, **extra,
    }


@dataclass
class ModelShape:
    """What the roofline needs of a model: per-token dense FLOPs, weight bytes, KV bytes, attention size."""
    dense_params: int  # every weight a token multiplies, except the embedding and the lm_head
    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    elt: int  # bytes per element of the model's dtype (the lm_head's weight)
    kv_elt: int  # bytes per K/V element (1 with an fp8 KV cache)
    dense_elt: float = 0  # bytes per dense (decoder matmul) weight element: 1 with fp8, ~0.52 with AWQ; 0: elt

    @classmethod
    def from_config(cls, cfg, dense_params: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
                    dense_dtype: torch.dtype | None = None) -> "ModelShape":
        from batchllm.engine.model_runner import kv_geometry

        kv_heads, head_dim = kv_geometry(cfg)
        return cls(dense_params=dense_params, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                   layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=kv_heads, head_dim=head_dim,
                   elt=dtype.itemsize, kv_elt=(kv_dtype or dtype).itemsize,
                   dense_elt=(dense_dtype or dtype).itemsize)

    @classmethod
    def from_llm(cls, llm) -> "ModelShape":
        model = llm.runner.model
        dense = sum(p.numel() for name, p in model.named_parameters()
                    if "embed_tokens" not in name and "lm_head" not in name)
        # weights reordered for the CPU's matmul (layers/linear.py) are no longer parameters
        dense += sum(m.packed.numel() for m in model.modules() if isinstance(m, MergedLinear) and m.packed is not None)
        linears = [m for m in model.modules() if isinstance(m, MergedLinear)]
        fp8 = [m for m in linears if m.fp8_weight is not None]
        dense += sum(m.fp8_weight.numel() for m in fp8)  # fp8 weights are no longer parameters either
        awq = [m for m in linears if m.qweight is not None]
        if awq:  # 4-bit weights: count the matrices they stand for, at their own bytes per element
            dense += sum(m.in_features * m.out_features - m.qweight.numel() - m.qzeros.numel() - m.scales.numel()
                         for m in awq)
            group = awq[0].in_features // awq[0].scales.shape[0]
            shape = cls.from_config(llm.hf_config, dense, llm.runner.dtype, llm.runner.kv_dtype)
            # a nibble, and a zero and a scale a group (steps that dequantize also write and reread bf16 weights:
            # not counted, so the bound is the 4-bit one)
            shape.dense_elt = 0.5 + (0.5 + awq[0].scales.element_size()) / group
            return shape
        return cls.from_config(llm.hf_config, dense, llm.runner.dtype, llm.runner.kv_dtype,
                               torch.float8_e4m3fn if fp8 else None)

    @property
    def weight_bytes(self) -> float:
        return self.dense_params * (self.dense_elt or self.elt) + self.hidden * self.vocab * self.elt  # lm_head once

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_elt

    @property
    def params(self) -> int:
        return self.dense_params + self.hidden * self.vocab


def step_parts(shape: ModelShape, starts: np.ndarray, q_lens: np.ndarray, num_sampled: int) -> dict:
    """FLOPs and bytes of one step's matmuls and attention. starts, q_lens: [num_seqs] context already cached,
    new tokens."""
    starts = starts.astype(np.float64)
    q = q_lens.astype(np.float64)
    tokens = q.sum()
    pairs = (q * starts + q * (q + 1) / 2).sum()  # causal query-key pairs
    kv_read = (starts + q).sum() * shape.kv_bytes_per_token
    kv_write = tokens * shape.kv_bytes_per_token
    return {"matmul_flops": 2 * shape.dense_params * tokens + 2 * shape.hidden * shape.vocab * num_sampled,
            "lm_head_flops": 2 * shape.hidden * shape.vocab * num_sampled,  # of matmul_flops
            "weight_bytes": shape.weight_bytes,
            "attention_flops": 4 * shape.layers * shape.heads * shape.head_dim * pairs,
            "kv_bytes": kv_read + kv_write}


def step_costs(shape: ModelShape, starts: np.ndarray, q_lens: np.ndarray, num_sampled: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one step."""
    p = step_parts(shape, starts, q_lens, num_sampled)
    return p["matmul_flops"] + p["attention_flops"], p["weight_bytes"] + p["kv_bytes"]


def roofline(shape: ModelShape, steps: list, peaks: dict, elapsed_s: float) -> dict:
    """steps: StepRecord-like objects with .starts, .q_lens, .num_sampled. Sums the per-step roofline.
    With fp8 weights (peaks has peak_tflops_dtype) the dense matmuls run at peak_tflops and the lm_head and
    attention at peak_tflops_dtype."""
    peak_flops = peaks["peak_tflops"] * 1e12
    peak_other = peaks.get("peak_tflops_dtype", peaks["peak_tflops"]) * 1e12
    peak_bw = peaks["peak_bw_gbs"] * 1e9
    total_flops = total_bytes = t_roof = t_compute = t_memory = t_serial = t_serial_decode = t_floor = 0.0
    bound_compute = 0
    for s in steps:
        p = step_parts(shape, s.starts, s.q_lens, s.num_sampled)
        flops, nbytes = p["matmul_flops"] + p["attention_flops"], p["weight_bytes"] + p["kv_bytes"]
        matmul_s = (p["matmul_flops"] - p["lm_head_flops"]) / peak_flops + p["lm_head_flops"] / peak_other
        attention = max(p["attention_flops"] / peak_other, p["kv_bytes"] / peak_bw)
        serial = max(matmul_s, p["weight_bytes"] / peak_bw) + attention
        t_serial += serial
        t_floor += matmul_s + attention
        if (s.q_lens == 1).all():
            t_serial_decode += serial
        tc, tm = matmul_s + p["attention_flops"] / peak_other, nbytes / peak_bw
        total_flops += flops
        total_bytes += nbytes
        t_roof += max(tc, tm)
        t_compute += tc
        t_memory += tm
        bound_compute += tc >= tm
    return {
        **peaks,
        "params": shape.params,
        "flops": total_flops,
        "bytes": total_bytes,
        "roofline_s": t_roof,
        "serial_roofline_s": t_serial,  # one kernel at a time: matmuls, then attention
        "serial_decode_s": t_serial_decode,  # of which the steps of decode rows only
        "serial_floor_s": t_floor,  # the serial bound with free weight reads, as at a batch large enough
        "compute_s": t_compute,  # if every step were compute bound
        "memory_s": t_memory,  # if every step were memory bound
        "compute_bound_steps": int(bound_compute),
        "achieved_tflops": total_flops / elapsed_s / 1e12 if elapsed_s > 0 else 0.0,
        "achieved_bw_gbs": total_bytes / elapsed_s / 1e9 if elapsed_s > 0 else 0.0,
        "efficiency": t_roof / elapsed_s if elapsed_s > 0 else 0.0,
        "serial_efficiency": t_serial / elapsed_s if elapsed_s > 0 else 0.0,
    }
