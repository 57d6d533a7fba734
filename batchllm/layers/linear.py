"""Linear layers. `MergedLinear` packs several HF projections (q/k/v, gate/up) into one matmul; each
shard is loaded into its slice by name. With quantization="fp8" each one's weight is quantized after loading
(`quantize_fp8`, batchllm/quant/fp8.py) and its matmul runs in fp8. With awq_group_size the layer holds an AWQ
checkpoint's 4-bit weight instead of a dense one (`qweight`, `qzeros`, `scales`, packed along the output as the
dense shards are; batchllm/quant/awq.py).

On the CPU the runner reorders weights once, after loading, into oneDNN's blocked layout (`pack_weight`): the
same matmul runs 1.2-1.9x faster at decode sizes (docs/benchmarks.md). A packed weight is only usable
through `packed_linear`.
"""
import torch
from torch import nn
from torch.nn import functional as F


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> the same matrix in oneDNN's blocked layout (a new tensor of the same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class MergedLinear(nn.Module):
    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 awq_group_size: int | None = None):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes  # HF projection name -> rows, in packing order
        out = sum(shard_sizes.values())
        self.out_features = out
        self.bias = nn.Parameter(torch.empty(out)) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout, after pack() (CPU)
        self.fp8_weight: torch.Tensor | None = None  # [out, in] float8_e4m3fn, after quantize_fp8()
        self.fp8_scale: torch.Tensor | None = None  # [out] fp32: weight ~= fp8_weight * fp8_scale[:, None]
        self.qweight = self.qzeros = self.scales = None  # AWQ (reference.awq_dequantize), with awq_group_size
        if awq_group_size:
            if in_features % awq_group_size or any(size % 8 for size in shard_sizes.values()):
                raise ValueError(f"AWQ: a {out}x{in_features} matmul (shards {list(shard_sizes.values())}) does not "
                                 f"split into groups of {awq_group_size} inputs and words of 8 outputs")
            self.weight = None
            frozen = dict(requires_grad=False)
            self.qweight = nn.Parameter(torch.empty(in_features, out // 8, dtype=torch.int32), **frozen)
            self.qzeros = nn.Parameter(torch.empty(in_features // awq_group_size, out // 8, dtype=torch.int32),
                                       **frozen)
            # fp16, as AutoAWQ writes them (the kernels multiply in fp32 whatever the model's dtype)
            self.scales = nn.Parameter(torch.empty(in_features // awq_group_size, out, dtype=torch.float16), **frozen)
        else:
            self.weight = nn.Parameter(torch.empty(out, in_features))
        self.awq_scratch: torch.Tensor | None = None  # CUDA: where large matmuls dequantize (quant/awq.prepare_model)

    def shard_slice(self, shard: str) -> slice:
        start = 0
        for name, size in self.shard_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (HF's `weight`, `bias`, or AWQ's `qweight`, `qzeros`, `scales`) into its shard."""
        if self.packed is not None or self.fp8_weight is not None:
            raise RuntimeError("weights cannot be loaded into a packed or quantized layer")
        sl = self.shard_slice(shard)
        dest = getattr(self, param, None)
        if not isinstance(dest, torch.Tensor):
            raise ValueError(f"{shard}.{param}: this layer has no such weight")
        if param in ("qweight", "qzeros"):  # 8 outputs a word
            dest = dest.data[:, sl.start // 8 : sl.stop // 8]
        elif param == "scales":
            dest = dest.data[:, sl]
        else:
            dest = dest.data[sl]
        if dest.shape != tensor.shape:
            raise ValueError(f"{shard}.{param}: shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)

    def pack(self) -> None:
        """Reorder the weight for the CPU's oneDNN matmul (see the module's docstring); the original is freed."""
        if self.packed is None and self.weight is not None and can_pack(self.weight):
            self.packed = pack_weight(self.weight.data)
            self.weight = None

    def quantize_fp8(self) -> None:
        """Weight -> fp8 (e4m3) with a scale per output row; the full-precision weight is freed."""
        from batchllm.kernels.reference import quantize_rows_fp8

        if self.fp8_weight is None:
            self.fp8_weight, self.fp8_scale = quantize_rows_fp8(self.weight.data)
            self.weight = None

    def dequantize_awq(self, dtype: torch.dtype) -> None:
        """AWQ weight -> a dense [out, in] weight in `dtype` (the CPU's path); the 4-bit one is freed."""
        from batchllm.kernels.reference import awq_dequantize

        if self.qweight is not None:
            w = awq_dequantize(self.qweight.data, self.qzeros.data, self.scales.data)
            self.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)
            self.qweight = self.qzeros = self.scales = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_weight is not None:
            from batchllm.quant.fp8 import fp8_linear

            return fp8_linear(x, self.fp8_weight, self.fp8_scale, self.bias)
        if self.qweight is not None:
            from batchllm.quant.awq import awq_linear

            return awq_linear(x, self.qweight, self.qzeros, self.scales, self.bias, self.awq_scratch)
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)
