"""EngineConfig's derived defaults."""
import pytest

from batchllm.engine.config import EngineConfig


@pytest.mark.parametrize("device, pool_tokens, want", [
    ("cpu", 10**6, 256),  # the CPU: 256 whatever the pool
    ("cuda", 100_000, 256),  # a small pool: never under 256
    ("cuda", 412_000, 402),  # llama3-8b on an H100: what the pool holds at 1,024 tokens a sequence
    ("cuda", 890_000, 869),  # on an H200
    ("cuda", 3_000_000, 1024),  # capped where graphs stop
])
def test_max_num_seqs_default_follows_the_kv_pool(device, pool_tokens, want):
    assert EngineConfig(model="m", device=device).max_num_seqs_for(pool_tokens) == want


def test_max_num_seqs_given_is_kept():
    assert EngineConfig(model="m", device="cuda", max_num_seqs=64).max_num_seqs_for(10**6) == 64
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        EngineConfig(model="m", max_num_seqs=0)
