"""EngineConfig: the engine's settings, frozen. Derived values are returned by methods, never written back."""
import functools
from dataclasses import dataclass


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls run ~2x fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


MIN_AUTO_SEQS, MAX_AUTO_SEQS = 256, 1024  # the running batch chosen by default on CUDA (max_num_seqs_for)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else float32
    block_size: int = 16
    max_num_seqs: int | None = None  # None: 256 on the CPU; on CUDA sized from the KV pool (max_num_seqs_for)
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 2048 on the CPU
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_kv_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 4.0
    quantization: str | None = None  # None | fp8 (quantized at load) | awq (an AWQ checkpoint's 4-bit weights); quant/
    kv_cache_dtype: str = "auto"  # auto: the model's dtype | fp8: K/V stored in e4m3, half the bytes of bf16
    enforce_eager: bool = False  # no CUDA graphs
    piecewise_graphs: bool = True  # CUDA: prefill and mixed steps of <= 4,096 tokens as graphs cut at attention
    async_scheduling: bool | None = None  # None: on for CUDA (schedule step N+1 while step N runs), off on the CPU
    seed: int = 0

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"engine arg {name}={getattr(self, name)!r}: {want}")

        if self.device not in ("auto", "cuda", "cpu") and not str(self.device).startswith("cuda:"):
            bad("device", "must be auto, cuda or cpu")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", "must be auto, float32, bfloat16 or float16")
        if self.block_size not in (8, 16, 32, 64, 128):
            bad("block_size", "must be one of 8, 16, 32, 64, 128")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            bad("num_kv_blocks", "must be >= 2")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad("max_model_len", "must be >= 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.quantization not in (None, "none", "fp8", "awq"):
            bad("quantization", "must be none, fp8 or awq")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            bad("kv_cache_dtype", "must be auto or fp8")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            if self.resolved_device().startswith("cuda") or cpu_has_bf16():
                return torch.bfloat16
            return torch.float32
        return getattr(torch, self.dtype)

    def resolved_kv_cache_dtype(self):
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.resolved_dtype()

    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.resolved_device().startswith("cuda")

    def max_num_seqs_for(self, kv_pool_tokens: int) -> int:
        """The running-batch cap. On CUDA by default: as many sequences as the KV pool holds at 1,024 tokens
        each, within 256..1024 (graphs are captured up to 1,024 rows). Big pools gain from a big batch (decode
        matmuls become compute-bound, the weights are read once for more tokens); a cap beyond what the pool
        holds only buys preemptions. 256 on the CPU."""
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        if not self.resolved_device().startswith("cuda"):
            return 256
        return max(MIN_AUTO_SEQS, min(MAX_AUTO_SEQS, kv_pool_tokens // 1024))

    def token_budget(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.resolved_device().startswith("cuda") else 2048
