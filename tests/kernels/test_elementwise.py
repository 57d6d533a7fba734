"""Triton rotary and SiLU-mul (kernels/elementwise.py) against their torch versions (layers/fused.py), on
fresh random inputs; under the Triton interpreter without a GPU."""
import pytest
import torch

pytest.importorskip("triton")
from batchllm.kernels import elementwise  # noqa: E402
from batchllm.layers import fused  # noqa: E402


def _check(out, x32_result, dtype):
    """fp32: to rounding. 16-bit: within one rounding of the float32 result (one rounding at the end, where
    eager torch rounds after every op)."""
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, x32_result, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        assert ((out.float() - x32_result).abs() <= eps * x32_result.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, heads, dim", [(1, 1, 64), (7, 12, 64), (33, 40, 128), (5, 20, 80)])
def test_rotary(device, dtype, tokens, heads, dim):
    g = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = torch.randn(tokens, heads + 3, dim, generator=g)
    cos, sin = torch.randn(tokens, 1, dim, generator=g), torch.randn(tokens, 1, dim, generator=g)
    x = qkv.to(dtype).to(device)[:, :heads]  # strided rows: a view of the fused q/k/v
    c, s = cos.to(dtype).to(device), sin.to(dtype).to(device)
    ref = fused._rotary(x.float(), c.float(), s.float()).cpu()
    out = elementwise.rotary(x, c, s)
    assert out.shape == (tokens, heads, dim) and out.is_contiguous()
    _check(out.cpu(), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n", [(1, 16), (9, 1536), (3, 3000)])
def test_silu_and_mul(device, dtype, rows, n):
    g = torch.Generator().manual_seed(rows * n)
    x = (torch.randn(rows, 2 * n, generator=g) * 4).to(dtype).to(device)
    x[0, :3] = torch.tensor([-100.0, 0.0, 30.0])  # sigmoid's tails and zero
    ref = fused._silu_and_mul(x.float()).cpu()
    _check(elementwise.silu_and_mul(x).cpu(), ref, dtype)


def test_empty_batch(device):
    x, cs = torch.empty(0, 4, 64, device=device), torch.empty(0, 1, 64, device=device)
    assert elementwise.rotary(x, cs, cs).shape == (0, 4, 64)
    assert elementwise.silu_and_mul(torch.empty(0, 32, device=device)).shape == (0, 16)
