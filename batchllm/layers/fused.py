"""Elementwise pieces of a decoder layer, written once in plain torch (HF transformers' arithmetic), and
fused per device. On CUDA, RMSNorm (+residual) is torch.compile'd into one generated kernel instead of 5-10
small launches (a decode step of a small model is launch-bound), and rotary and SiLU-mul are hand-written
Triton kernels (kernels/elementwise.py: the compiled ones ran at 1/7 and 1/2 of bandwidth). On the CPU, C kernels
(kernels/cpu_ops.c: RMSNorm and rotary, the same arithmetic in one pass; at a prefill chunk's size RMSNorm runs
~13x faster than its 9 eager ops). SiLU-mul stays eager on the CPU: two ops, and torch's vector exp is as fast.
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
    """Swap in the CUDA versions: torch.compile'd norms (dynamic in the token count: one compile each), Triton
    rotary and SiLU-mul."""
    global rms_norm, add_rms_norm, silu_and_mul, rotary
    if rms_norm is not _rms_norm:
        return

    def c(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    from batchllm.kernels import elementwise  # Triton: rotary and SiLU-mul at ~copy bandwidth (kernels/elementwise.py)

    rms_norm, add_rms_norm = c(_rms_norm), c(_add_rms_norm)
    silu_and_mul, rotary = elementwise.silu_and_mul, elementwise.rotary


def enable_cpu_kernels() -> None:
    """Swap in the C versions (kernels/cpu.py) where they take the tensors; torch elsewhere."""
    global rms_norm, add_rms_norm, rotary
    from batchllm.kernels import cpu

    if rms_norm is not _rms_norm or cpu.load() is None:
        return

    def rms_norm_c(x, weight, eps):
        if x.dim() == 2 and x.shape[1] <= cpu.MAX_HIDDEN and cpu.fits(x, weight):
            return cpu.rms_norm(x, weight, eps)
        return _rms_norm(x, weight, eps)

    def add_rms_norm_c(x, residual, weight, eps):
        if x.dim() == 2 and x.shape == residual.shape and x.shape[1] <= cpu.MAX_HIDDEN and cpu.fits(x, residual, weight):
            return cpu.rms_norm(x, weight, eps, residual)
        return _add_rms_norm(x, residual, weight, eps)

    def rotary_c(x, cos, sin):
        if (x.dim() == 3 and x.stride(1) == x.shape[2] and cos.is_contiguous() and sin.is_contiguous()
                and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2]) and cpu.fits(x, cos, sin)):
            return cpu.rotary(x, cos, sin)
        return _rotary(x, cos, sin)

    rms_norm, add_rms_norm, rotary = rms_norm_c, add_rms_norm_c, rotary_c
