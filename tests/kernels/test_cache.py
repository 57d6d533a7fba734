"""reshape_and_cache (Triton) against reference.reshape_and_cache: exact copies, slot -1 untouched."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from batchllm.kernels import reference  # noqa: E402
from batchllm.kernels.cache import reshape_and_cache  # noqa: E402


@pytest.mark.parametrize(
    "dtype, num_kv_heads, head_dim, block_size",
    [(torch.float32, 2, 64, 16), (torch.bfloat16, 8, 128, 32), (torch.float16, 3, 64, 16)],
)
def test_matches_reference(dtype, num_kv_heads, head_dim, block_size, device):
    gen = torch.Generator().manual_seed(head_dim + num_kv_heads)
    num_blocks, num_tokens = 9, 23
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    value_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    # key/value as strided views of a fused buffer, as a QKV projection leaves them.
    kv = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen).to(dtype).to(device)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads + 1 :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 5, 22]] = -1  # padding rows: write nothing
    slots = slots.to(device)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
    before_k = key_cache.clone()
    reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, ref_k)
    assert torch.equal(value_cache, ref_v)
    # Only the kept slots changed; padding tokens' data appears nowhere.
    changed = (key_cache != before_k).flatten(2).any(-1).flatten()
    kept = slots[slots >= 0].long().cpu()
    assert set(changed.nonzero().flatten().tolist()) <= set(kept.tolist())
    assert changed[kept].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_cache_rounds_like_torch(dtype, device):
    """An fp8 (e4m3) cache holds exactly what the reference's cast holds: nearest-even, saturated at +-448.

    Values from 1e-4 to 1e4: subnormals, every binade, the rounding carries into the next binade (which
    Triton's interpreter gets wrong in a plain cast), ties (16-bit inputs have few mantissa bits), saturation."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, kvh, d, n = 6, 16, 2, 64, 80
    shape = (num_blocks, block_size, kvh, d)
    key = (torch.randn(n, kvh, d, generator=gen) * torch.exp(torch.randn(n, kvh, d, generator=gen) * 3)).to(dtype)
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 0.0, 124.9]).to(dtype)  # (NaN: tests/gpu; the interpreter casts it wrong)
    value = torch.randn(n, kvh, d, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[3] = -1
    caches = [torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device) for _ in range(4)]
    key, value, slots = key.to(device), value.to(device), slots.to(device)
    reference.reshape_and_cache(key, value, caches[0], caches[1], slots)
    reshape_and_cache(key, value, caches[2], caches[3], slots)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert not want.float().isnan().any()
        assert torch.equal(got.float(), want.float())
    assert caches[0].float().abs().max() == 448.0  # saturated, not NaN
