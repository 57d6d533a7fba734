"""kernels/awq.py against kernels/reference.py, and the reference against AutoAWQ's packing."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from batchllm.kernels import reference  # noqa: E402
from batchllm.kernels.awq import awq_gemm, config  # noqa: E402
from tiny_models import awq_pack  # noqa: E402


def random_awq(k: int, n: int, group: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group, n), generator=gen)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).to(dtype)
    return q, z, s, awq_pack(q), awq_pack(z)


def test_unpack_inverts_autoawq_packing():
    q, z, s, qw, qz = random_awq(64, 48, 32, seed=1)
    assert torch.equal(reference.awq_unpack(qw), q.int())
    assert torch.equal(reference.awq_unpack(qz), z.int())
    w = reference.awq_dequantize(qw, qz, s)
    want = (q - z.repeat_interleave(32, 0)).float() * s.repeat_interleave(32, 0)
    assert torch.equal(w, want)
    assert (qw < 0).any()  # words with the top bit set (column 7 >= 8) unpack through the sign


@pytest.mark.parametrize("m, k, n, group, dtype", [
    (1, 256, 64, 128, torch.float32),
    (5, 256, 136, 64, torch.float32),  # N not a multiple of the tile
    (33, 128, 64, 32, torch.float16),
    (70, 256, 128, 128, torch.float16),
])
def test_gemm_matches_reference(m, k, n, group, dtype, device, relative_error):
    _, _, s, qw, qz = random_awq(k, n, group, seed=m + k + n, dtype=dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    want = reference.awq_linear(x, qw, qz, s)
    args = [t.to(device) for t in (x, qw, qz, s)]
    for split in (1, 3):  # the direct store, and fp32 partials of uneven runs of K slices
        cfg = dict(config(m, n, k, group), SPLIT_K=split)
        got = awq_gemm(*args, cfg=cfg)
        assert got.dtype == dtype and got.shape == (m, n)
        assert relative_error(got.float().cpu(), want) < (1e-5 if dtype == torch.float32 else 2e-3), cfg


def test_config_splits_k_only_when_tiles_are_few():
    decode = config(1, 4096, 4096, 128, sms=132)
    assert decode["SPLIT_K"] > 1 and 32 * decode["SPLIT_K"] <= 4 * 132
    assert config(4096, 4096, 4096, 128, sms=132)["SPLIT_K"] == 1
    assert config(1, 64, 256, 32)["BLOCK_K"] == 32  # a slice never spans two groups
    with pytest.raises(ValueError, match="do not fit"):
        awq_gemm(torch.zeros(2, 64), torch.zeros(64, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32),
                 torch.zeros(2, 64))


@pytest.mark.parametrize("m", [3, 200])
def test_awq_matmul_takes_either_path(m, device, relative_error, monkeypatch):
    """awq_matmul: the fused kernel under DEQUANTIZE_FROM_M rows, the dequantized weight and a matmul from there."""
    from batchllm.kernels import awq

    _, _, s, qw, qz = random_awq(128, 64, 64, seed=m)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    calls, fused = [], awq.awq_gemm
    monkeypatch.setattr(awq, "awq_gemm", lambda *a: calls.append(m) or fused(*a))
    got = awq.awq_matmul(x.to(device), qw.to(device), qz.to(device), s.to(device))
    assert bool(calls) == (m < awq.DEQUANTIZE_FROM_M)
    assert relative_error(got.cpu(), reference.awq_linear(x, qw, qz, s)) < 1e-5


@pytest.mark.parametrize("k, n, group", [(256, 64, 128), (128, 136, 32)])
def test_dequantize_matches_reference(k, n, group, device):
    from batchllm.kernels.awq import awq_dequantize

    _, _, s, qw, qz = random_awq(k, n, group, seed=k + n)
    want = reference.awq_dequantize(qw, qz, s)
    got = awq_dequantize(qw.to(device), qz.to(device), s.to(device))
    assert got.dtype == s.dtype and torch.equal(got.cpu(), want)
