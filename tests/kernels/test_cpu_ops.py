"""The CPU's C elementwise ops (kernels/cpu_ops.c) against their torch versions in batchllm/layers/fused.py,
and the C cache write against the reference, on fresh random inputs."""
import pytest
import torch

from batchllm.kernels import cpu, reference
from batchllm.layers import fused

if cpu.load() is None:
    pytest.skip("CPU kernels unavailable (no C compiler)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]


def _close(out, ref):
    """fp32: to rounding; bf16: the same values but for rare one-ulp differences (a different summation order
    inside RMSNorm's mean can move a rounding boundary)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
        assert (out != ref).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 64), (37, 576), (300, 1024)])
def test_rms_norm(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden + 8, generator=g) * 3)[:, :hidden].to(dtype)  # row-strided, as a slice
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + torch.randn(hidden, generator=g) * 0.1).to(dtype)
    _close(cpu.rms_norm(x, w, 1e-5), fused._rms_norm(x, w, 1e-5))
    out, new_res = cpu.rms_norm(x, w, 1e-6, residual=res)
    ref_out, ref_res = fused._add_rms_norm(x, res, w, 1e-6)
    _close(out, ref_out)
    assert torch.equal(new_res, ref_res)  # one add, rounded once: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, heads, dim", [(5, 12, 64), (64, 40, 128), (3, 2, 32)])
def test_rotary(dtype, rows, heads, dim):
    g = torch.Generator().manual_seed(rows + heads + dim)
    qkv = torch.randn(rows, heads + 3, dim, generator=g).to(dtype)
    x = qkv[:, :heads]  # strided rows: the engine rotates a view of the fused q/k/v
    cos = torch.randn(rows, 1, dim, generator=g).to(dtype)
    sin = torch.randn(rows, 1, dim, generator=g).to(dtype)
    out = cpu.rotary(x, cos, sin)
    assert torch.equal(out, fused._rotary(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(dtype):
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(7, 2, 4, 32, generator=g).to(dtype)[:, :, :3]  # [tokens, k/v, kv_heads, dim]: strided views
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([5, -1, 0, 17, 31, -1, 8])
    k_cpu = torch.zeros(cpu.key_cache_shape(2, 16, 3, 32), dtype=dtype)  # K transposed within a block
    caches = [torch.zeros(2, 16, 3, 32, dtype=dtype) for _ in range(3)]
    cpu.reshape_and_cache(key, value, k_cpu, caches[0], slots)
    reference.reshape_and_cache(key, value, caches[1], caches[2], slots)
    assert torch.equal(k_cpu, caches[1].permute(0, 2, 3, 1)) and torch.equal(caches[0], caches[2])
    assert k_cpu.abs().sum() > 0


def test_engine_ops_use_c_and_fall_back():
    """enable_cpu_kernels() routes the ops the engine calls to C, and shapes C does not take to torch."""
    fused.enable_cpu_kernels()
    try:
        x = torch.randn(4, 3, 64)[:, :2]  # a 3-D norm input (Qwen3's q/k norm): torch
        w = torch.ones(64)
        assert torch.equal(fused.rms_norm(x, w, 1e-6), fused._rms_norm(x, w, 1e-6))
        d = torch.randn(4, 8, dtype=torch.float64)  # float64: torch
        assert torch.equal(fused.rms_norm(d, torch.ones(8, dtype=torch.float64), 1e-6),
                           fused._rms_norm(d, torch.ones(8, dtype=torch.float64), 1e-6))
        assert fused.rms_norm is not fused._rms_norm
    finally:
        fused.rms_norm, fused.add_rms_norm = fused._rms_norm, fused._add_rms_norm
        fused.rotary = fused._rotary
