"""MergedLinear on the CPU: the oneDNN-reordered weight gives F.linear's result, and the layer refuses loads after."""
import pytest
import torch
from torch.nn import functional as F

from batchllm.layers.linear import MergedLinear, can_pack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_packed_matches_linear(dtype, bias, rows):
    if not can_pack(torch.empty(1, dtype=dtype)):
        pytest.skip("this torch has no oneDNN weight reordering")
    g = torch.Generator().manual_seed(rows)
    layer = MergedLinear(96, {"gate_proj": 64, "up_proj": 64}, bias=bias).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    w, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, 96, generator=g).to(dtype)
    ref = F.linear(x, w, b)
    layer.pack()
    assert layer.weight is None and layer.packed is not None
    out = layer(x)
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=0.25)
    with pytest.raises(RuntimeError, match="packed"):
        layer.load_shard("gate_proj", "weight", torch.zeros(64, 96))
