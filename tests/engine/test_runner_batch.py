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
