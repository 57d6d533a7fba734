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


def test_cheapest_rows_defers_only_for_a_clearly_cheaper_row():
    from batchllm.engine.cuda_graphs import cheapest_rows

    # sizes 16, 32, 48, 64: 48 rows pad to 64 (2.0 ms); 32 rows cost 1.2 ms, 0.0375 ms a row
    sizes, cost = [16, 32, 48, 64], [1.0, 1.2, 3.0, 2.0]
    pad = padding_table(cost)
    assert pad == [0, 1, 3, 3]
    rows = cheapest_rows(sizes, cost, pad)
    assert len(rows) == 65 and rows[0] == 0
    assert rows[:17] == list(range(17))
    assert rows[17] == 16  # 17 rows on the 32-row graph: 0.0706 a row; 16 of them: 0.0625
    assert rows[19] == 19 and rows[32] == 32  # 1.2 / 19 = 0.0632: within the slack
    assert rows[40] == 32  # 40 rows on the 64-row graph: 0.05 a row; 32 of them: 0.0375
    assert rows[51] == 32  # 2.0 / 51 = 0.0392 a row: more than 3% dearer than 32's 0.0375
    assert rows[52] == 52  # 2.0 / 52 = 0.0385: within the slack, all run
    assert rows[64] == 64
    # below `first` (split-KV sizes) nothing is deferred, and nothing is deferred to them
    assert cheapest_rows(sizes, cost, pad, first=2)[40] == 40


def test_rows_to_run_before_and_after_measure():
    import torch

    from batchllm.engine.cuda_graphs import DecodeGraphs, cheapest_rows

    graphs = DecodeGraphs(None, torch.device("cpu"), max_num_seqs=64, max_blocks_per_seq=4, max_model_len=64)
    assert graphs.rows_to_run(40) == 40  # not measured: every ready row runs
    cost = [1.0] * (len(graphs.sizes) - 1) + [9.0]
    graphs._pad = padding_table(cost)
    graphs._rows = cheapest_rows(graphs.sizes, cost, graphs._pad)
    assert graphs.sizes[-2:] == [48, 64]
    assert graphs.rows_to_run(50) == 48 and graphs.rows_to_run(48) == 48 and graphs.rows_to_run(100) == 100
