"""SiLU-and-mul on a packed gate/up projection: x: [..., 2 * d] -> [..., d]."""
import torch
from torch.nn import functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
