"""AWQ checkpoints (quantization="awq"): 4-bit weights with a scale and a zero per group of input channels, as
AutoAWQ writes them (`quant_method: awq`, `version: gemm`; vLLM and transformers read the same files).

Every decoder matmul (q/k/v, o, gate/up, down) loads `qweight` [K, N/8] int32, `qzeros` [K/G, N/8] int32 and
`scales` [K/G, N] straight from the checkpoint; q/k/v and gate/up are packed side by side along N as the dense
weights are. Embeddings, norms and the lm_head stay in the model's dtype.

- CUDA: the weights stay 4-bit (a quarter of bf16's bytes). A matmul of few rows runs kernels/awq.py's fused
  kernel, which dequantizes tile by tile in registers; one of many rows dequantizes the weight into a scratch
  buffer and multiplies with cuBLAS (kernels/awq.py: awq_matmul).
- CPU: each weight is dequantized once, at load, into the model's dtype, and runs as a dense matmul: the same
  numbers, at dense speed and size (for development and tests).

Random-weight presets take quantization="awq" too (`random_config`), for the benchmark.
"""
import torch

from batchllm.kernels import reference

# A decoder matmul named in modules_to_not_convert would be left dense in the checkpoint: such files are refused.
_DECODER_MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "self_attn", "mlp",
                    "layers")


def _as_dict(quant) -> dict:
    return quant if isinstance(quant, dict) else quant.to_dict()


def _plain(value):
    """A config value as written in config.json (transformers 4's AwqConfig holds enums)."""
    return getattr(value, "value", value)


def checkpoint_method(hf_config) -> str | None:
    """The checkpoint's quant_method (e.g. "awq"), or None for a full-precision checkpoint."""
    quant = getattr(hf_config, "quantization_config", None)
    return str(_plain(_as_dict(quant).get("quant_method", "?"))) if quant else None


def random_config(group_size: int = 128) -> dict:
    """The quantization_config a random-weight preset gets with quantization="awq"."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def group_size(hf_config) -> int:
    """The checkpoint's AWQ group size, after checking that its layout is one batchllm reads (ValueError if not)."""
    q = _as_dict(hf_config.quantization_config)
    bits = next((q[k] for k in ("bits", "w_bit") if q.get(k) is not None), None)  # HF's key, or AutoAWQ's
    group = next((q[k] for k in ("group_size", "q_group_size") if q.get(k) is not None), None)
    version = str(_plain(q.get("version", "gemm"))).lower()
    if bits != 4:
        raise ValueError(f"AWQ checkpoint with bits={bits}: batchllm reads 4-bit AWQ only")
    if q.get("zero_point", True) is not True:
        raise ValueError("AWQ checkpoint with zero_point=false: batchllm reads AWQ with zero points only")
    if version != "gemm":
        raise ValueError(f"AWQ checkpoint of version {version!r}: batchllm reads version 'gemm' only")
    if not isinstance(group, int) or group < 16 or group & (group - 1):
        raise ValueError(f"AWQ checkpoint with group_size={group}: batchllm needs a power of 2, at least 16")
    skipped = [m for m in (q.get("modules_to_not_convert") or []) if any(d in m for d in _DECODER_MATMULS)]
    if skipped:
        raise ValueError(f"AWQ checkpoint with modules_to_not_convert={skipped}: batchllm needs every decoder "
                         "matmul quantized")
    return group


def layer_group_size(hf_config) -> int | None:
    """The group size the model's matmul layers are built with: the AWQ group, or None for dense layers."""
    return group_size(hf_config) if checkpoint_method(hf_config) == "awq" else None


def awq_linear(x: torch.Tensor, qweight, qzeros, scales, bias, scratch=None) -> torch.Tensor:
    """x [..., K] @ the AWQ weight (+ bias) -> [..., N] in x's dtype: kernels/awq.py on CUDA (scratch: a flat
    buffer of x's dtype the weight may be dequantized into), the reference elsewhere (the CPU engine dequantizes
    at load instead, see the module's docstring)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        from batchllm.kernels.awq import awq_matmul

        out = awq_matmul(x2.contiguous(), qweight, qzeros, scales, scratch)
    else:
        out = reference.awq_linear(x2, qweight, qzeros, scales).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], scales.shape[1])


def prepare_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """After loading. Off CUDA: every AWQ layer dequantized to `dtype`, once. On CUDA: one shared buffer, the
    largest layer's size, for large matmuls to dequantize into: allocated once, before the KV pool is sized and
    outside every CUDA graph's memory pool."""
    from batchllm.layers.linear import MergedLinear

    layers = [m for m in model.modules() if isinstance(m, MergedLinear) and m.qweight is not None]
    if device.type != "cuda":
        for m in layers:
            m.dequantize_awq(dtype)
    elif layers:
        scratch = torch.empty(max(m.in_features * m.out_features for m in layers), dtype=dtype, device=device)
        for m in layers:
            m.awq_scratch = scratch


@torch.no_grad()
def random_init(model: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Random AWQ weights for a preset: uniform nibbles, zero point 8, scales giving weights of about `std`."""
    from batchllm.layers.linear import MergedLinear

    for m in model.modules():
        if isinstance(m, MergedLinear) and m.qweight is not None:
            bits = torch.randint(-2**31, 2**31 - 1, m.qweight.shape, generator=generator, device=m.qweight.device,
                                 dtype=torch.int64)
            m.qweight.copy_(bits.to(torch.int32))
            m.qzeros.fill_(0x88888888 - (1 << 32))  # every nibble 8 (0x88888888 as an int32)
            m.scales.fill_(std / 4.6)  # uniform 0..15 minus 8: standard deviation ~4.6
