"""RMSNorm with an optional fused residual add; the arithmetic is HF transformers' (see fused.py)."""
import torch
from torch import nn

from batchllm.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., hidden] -> normed x; with residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)
