"""Linear layers. `MergedLinear` packs several HF projections (q/k/v, gate/up) into one matmul; each
shard is loaded into its slice by name. With quantization="fp8" each one's weight is quantized after loading
(`quantize_fp8`, batchllm/quant/fp8.py) and its matmul runs in fp8.

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
    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes  # HF projection name -> rows, in packing order
        out = sum(shard_sizes.values())
        self.out_features = out
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout, after pack() (CPU)
        self.qweight: torch.Tensor | None = None  # [out, in] float8_e4m3fn, after quantize_fp8()
        self.scale: torch.Tensor | None = None  # [out] fp32: weight ~= qweight * scale[:, None]

    def shard_slice(self, shard: str) -> slice:
        start = 0
        for name, size in self.shard_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        if self.packed is not None or self.qweight is not None:
            raise RuntimeError("weights cannot be loaded into a packed or quantized layer")
        getattr(self, param).data[self.shard_slice(shard)].copy_(tensor)

    def pack(self) -> None:
        """Reorder the weight for the CPU's oneDNN matmul (see the module's docstring); the original is freed."""
        if self.packed is None and self.weight is not None and can_pack(self.weight):
            self.packed = pack_weight(self.weight.data)
            self.weight = None

    def quantize_fp8(self) -> None:
        """Weight -> fp8 (e4m3) with a scale per output row; the full-precision weight is freed."""
        from batchllm.kernels.reference import quantize_rows_fp8

        if self.qweight is None:
            self.qweight, self.scale = quantize_rows_fp8(self.weight.data)
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            from batchllm.quant.fp8 import fp8_linear

            return fp8_linear(x, self.qweight, self.scale, self.bias)
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)
