"""FP8 weights (quantization="fp8"): a bf16 / fp16 / fp32 checkpoint quantized when it loads, as vLLM's online
fp8 does. Every decoder matmul (q/k/v, o, gate/up, down) keeps its weight in float8_e4m3fn with one scale per
output channel; its input is quantized per row (token) at run time; the product runs on the fp8 tensor cores
(torch._scaled_mm, fp32 accumulation) and comes back in the model's dtype. Embeddings, norms and the lm_head stay
in the model's dtype. Scales are powers of 2 (reference.fp8_row_scales).

Half the weight bytes of bf16, and on Hopper twice the matmul peak. On the CPU the same arithmetic runs through
torch's reference _scaled_mm: correct, and much slower than bf16 (for tests, not for speed).
"""
import torch

from batchllm.kernels import reference
from batchllm.layers.linear import MergedLinear


def require_fp8_gpu(device: torch.device, what: str) -> None:
    """Raise ValueError if `device` is a CUDA GPU without fp8 (compute capability under 8.9); the CPU passes."""
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise ValueError(f"{what} needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                             f"{cc[0]}.{cc[1]}")


def check_device(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError where fp8 matmuls cannot run: CUDA before compute capability 8.9, or CUDA with a
    result dtype other than bf16 (torch's row-wise scaled matmul returns bf16 only)."""
    require_fp8_gpu(device, "quantization fp8")
    if device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        raise ValueError(f"quantization fp8 computes in bfloat16 on CUDA; dtype is {str(dtype).split('.')[-1]}: "
                         "use dtype auto or bfloat16")
    try:  # row-wise scaled fp8 matmuls need a recent torch on this card: find out now, not mid-profile
        x = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(x, x.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"quantization fp8: torch {torch.__version__} cannot run row-wise scaled fp8 matmuls on "
                         f"this GPU ({first})") from None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M]): the Triton kernel on CUDA, the reference elsewhere (same bits)."""
    if x.is_cuda:
        from batchllm.kernels import fp8

        return fp8.quantize_rows(x)
    return reference.quantize_rows_fp8(x)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ (qweight [N, K] fp8 * scale [N]).T (+ bias) -> [..., N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(x2.contiguous())
    out = torch._scaled_mm(xq, qweight.t(), scale_a=xs[:, None], scale_b=scale[None, :], out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], qweight.shape[0])


@torch.no_grad()
def quantize_model(model: torch.nn.Module) -> int:
    """Quantize every MergedLinear of `model` in place; returns how many."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MergedLinear)]
    for name, m in layers:  # fp8 matmul kernels take K and N in multiples of 16
        if m.in_features % 16 or m.out_features % 16:
            raise ValueError(f"quantization fp8: {name} is {m.out_features}x{m.in_features}; fp8 matmuls need both "
                             "sizes in multiples of 16")
    for _, m in layers:
        m.quantize_fp8()
    if layers and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed full-precision weights
    return len(layers)
