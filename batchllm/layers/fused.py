"""Elementwise pieces of a decoder layer, written once in plain torch and fused by torch.compile on CUDA.

Eager (the CPU path) keeps HF transformers' exact arithmetic, which token parity relies on. On CUDA each
function becomes one generated Triton kernel instead of 5-10 small launches: at small models a decode step
is launch-bound (about 40 launches per layer before fusion).
"""
import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] -> RMSNorm in float32, cast back, then scaled (HF's order)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _add_rms_norm(x, residual, weight, eps: float):
    """-> (rms_norm(x + residual), x + residual): the residual add fused into the next norm."""
    s = x + residual
    return _rms_norm(s, weight, eps), s


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate, up) -> silu(gate) * up: [num_tokens, d]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin (sign-folded): [num_tokens, 1, head_dim]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


rms_norm, add_rms_norm, silu_and_mul, rotary = _rms_norm, _add_rms_norm, _silu_and_mul, _rotary


def enable_compile() -> None:
    """Swap in torch.compile'd versions (CUDA). Shapes are dynamic in the token count: one compile each."""
    global rms_norm, add_rms_norm, silu_and_mul, rotary
    if rms_norm is not _rms_norm:
        return

    def c(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    rms_norm, add_rms_norm, silu_and_mul, rotary = c(_rms_norm), c(_add_rms_norm), c(_silu_and_mul), c(_rotary)
