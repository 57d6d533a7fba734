"""The model runner's batch helpers (host side, no device)."""
import numpy as np
import pytest

from batchllm.engine.model_runner import _leading_ones, profile_q_lens


@pytest.mark.parametrize("tokens, num_seqs", [(8192, 512), (8192, 256), (128, 64), (2048, 512), (7, 3), (1, 1)])
def test_profile_step_is_mixed_and_full(tokens, num_seqs):
    q_lens, num_decodes = profile_q_lens(tokens, num_seqs)
    assert len(q_lens) == num_seqs and q_lens.sum() == tokens
    assert (q_lens[:num_decodes] == 1).all() and _leading_ones(q_lens) >= num_decodes
    if num_decodes:
        assert (q_lens[num_decodes:] >= 2).all()  # a mixed step: the split launch runs at start-up
    if (tokens, num_seqs) == (8192, 512):
        assert num_decodes == 256 and q_lens.max() >= 16


def test_leading_ones():
    assert _leading_ones(np.array([1, 1, 5, 1])) == 2
    assert _leading_ones(np.array([1, 1])) == 2
    assert _leading_ones(np.array([3, 1])) == 0


def test_size_pool_measures_again_at_a_lower_cap():
    from batchllm.engine.model_runner import size_pool

    calls = []

    def blocks_for_rows(rows):  # each sampled row costs 2 blocks of memory
        calls.append(rows)
        return 30_000 - 2 * rows

    def cap(blocks):  # as EngineConfig.max_num_seqs_for, 16-token blocks
        return max(256, min(1024, blocks * 16 // 1024))

    # sampling 1,024 rows leaves 27,952 blocks, a cap of 436; measured again at 436 rows: 29,128 blocks. The
    # largest consistent cap: (30,000 - 2s) * 16 / 1,024 >= s, so s = 454 with 29,092 blocks
    assert size_pool(blocks_for_rows, cap, 1024, again=True) == (29_092, 454)
    assert calls == [1024, 436]
    assert cap(29_092) == 454 and cap(30_000 - 2 * 455) < 455
    calls.clear()
    assert size_pool(blocks_for_rows, cap, 1024, again=False) == (27_952, 436)  # the CPU: one pass
    assert calls == [1024]
    assert size_pool(lambda rows: 10**6, cap, 1024, again=True) == (10**6, 1024)  # the cap reaches the bound
    assert size_pool(lambda rows: 10_000, cap, 1024, again=True) == (10_000, 256)  # rows cost nothing: floor
