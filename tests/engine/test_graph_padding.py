"""Which captured decode graph a batch runs on: the cheapest that fits it (cuda_graphs.padding_table). The timing
itself needs a GPU (tests/gpu); the choice is plain arithmetic, checked here."""
from batchllm.engine.cuda_graphs import capture_sizes, padding_table


def test_pads_up_only_to_a_clearly_cheaper_size():
    # sizes 16, 32, 48, 64, 80: 48 rows cost more than 64 (a tile boundary), 80 is dearer again
    cost = [1.0, 2.0, 3.5, 2.5, 3.0]
    assert padding_table(cost) == [0, 1, 3, 3, 4]
    # within the slack (3%) a batch keeps its own size: noise does not move it
    assert padding_table([1.0, 2.0, 2.55, 2.5, 3.0]) == [0, 1, 2, 3, 4]
    # monotone costs: every size is its own best
    assert padding_table([1, 2, 3, 4]) == [0, 1, 2, 3]
    # the cheapest of several larger ones, not the nearest cheaper one
    assert padding_table([5.0, 4.0, 3.0, 9.0]) == [2, 2, 2, 3]


def test_small_sizes_keep_their_own_and_padded_size_follows_the_table():
    import torch

    from batchllm.engine.cuda_graphs import DecodeGraphs

    cost = [3.0, 1.0, 2.0, 1.5, 4.0]  # sizes 1, 2, 4, 8, 16
    assert padding_table(cost, first=2) == [0, 1, 3, 3, 4]  # 1 would pad to 2, but sits below `first`
    graphs = DecodeGraphs(None, torch.device("cpu"), max_num_seqs=16, max_blocks_per_seq=4, max_model_len=64)
    assert graphs.sizes == [1, 2, 4, 8, 16]
    graphs._pad = padding_table(cost, first=2)
    assert [graphs.padded_size(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 8, 8, 8, 16, 16, None]


def test_capture_sizes_end_at_the_cap():
    sizes = capture_sizes(700)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-3:] == [576, 640, 700]
    assert sizes == sorted(set(sizes))
