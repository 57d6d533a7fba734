"""Linear layers. `MergedLinear` packs several HF projections (q/k/v, gate/up) into one matmul; each
shard is loaded into its slice by name. Quantization swaps these modules at runtime (batchllm/quant)."""
import torch
from torch import nn
from torch.nn import functional as F


class MergedLinear(nn.Module):
    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes  # HF projection name -> rows, in packing order
        out = sum(shard_sizes.values())
        self.out_features = out
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def shard_slice(self, shard: str) -> slice:
        start = 0
        for name, size in self.shard_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        getattr(self, param).data[self.shard_slice(shard)].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
