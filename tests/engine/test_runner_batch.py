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


def test_size_pool_cap_and_pool_agree():
    from batchllm.engine.model_runner import size_pool

    calls = []

    def blocks_for_rows(rows):  # each sampled row costs 2 blocks of memory
        calls.append(rows)
        return 30_000 - 2 * rows

    def cap(blocks):  # as EngineConfig.max_num_seqs_for, 16-token blocks
        return max(256, min(1024, blocks * 16 // 1024))

    # 256 rows leave 29,488 blocks, a cap of 460 at most; measured again at 460 rows. The largest consistent
    # cap: (30,000 - 2s) * 16 / 1,024 >= s, so s = 454 with 29,092 blocks
    assert size_pool(blocks_for_rows, cap, 256, 1024) == (29_092, 454)
    assert calls == [256, 460]
    assert cap(29_092) == 454 and cap(30_000 - 2 * 455) < 455
    calls.clear()
    # a small card: 256 rows leave room for no more than the smallest cap, measured once
    assert size_pool(lambda rows: calls.append(rows) or 9_000 - rows, cap, 256, 1024) == (8_744, 256)
    assert calls == [256]
    assert size_pool(lambda rows: 10**6, cap, 256, 1024) == (10**6, 1024)  # a big pool: the cap's top
