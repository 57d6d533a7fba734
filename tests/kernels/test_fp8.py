"""kernels/fp8.py against kernels/reference.py: per-row fp8 quantization, bit for bit."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from batchllm.kernels import reference  # noqa: E402
from batchllm.kernels.fp8 import quantize_rows  # noqa: E402


@pytest.mark.parametrize("dtype, k", [(torch.bfloat16, 4096 + 64), (torch.float32, 96), (torch.float16, 200)])
def test_quantize_rows_matches_reference(dtype, k, device):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=gen) * torch.exp(torch.randn(9, 1, generator=gen) * 4)  # rows of any size
    x[1] = 0.0  # a row of zeros: scale 2^-100, all zeros
    x[2, :3] = torch.tensor([448.0, -448.0, 447.9])  # an exact power-of-2 edge (max = 448 * 1)
    x = x.to(dtype).to(device)
    q, scale = quantize_rows(x)
    q_ref, scale_ref = reference.quantize_rows_fp8(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float())
    assert scale[2].item() == 1.0 and scale[1].item() == 2.0**-100
    # powers of 2 that leave no row over 448, and no row under half of it (the top binade used)
    amax = x.float().abs().amax(-1)
    assert ((amax / scale <= 448) & ((amax == 0) | (amax / scale > 224))).all()
    err = (q.float() * scale[:, None] - x.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp(min=1e-30)
    assert (err < 0.04).all(), err  # 3 mantissa bits: ~2% a row
