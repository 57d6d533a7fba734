"""CUDA graphs for decode steps: one graph per padded batch size, captured from the largest down into one
memory pool. Inputs live in static device buffers; a replay copies the step's values in, pads the unused
rows with slot -1 (the cache kernel skips it) and seq_len 1, and returns the hidden states of the real rows.

Each graph's replay is timed after capture (`measure`), and a batch takes the fastest graph that fits it, not
always the smallest: cuBLAS picks its tiles by size, so a step's cost is not monotone in its rows (llama3-8b on
an H100: gate_up at 400 rows ran 384-row tiles, the second almost empty). Padded rows cost matmul work only;
attention skips them.
"""
import bisect

import numpy as np
import torch

from batchllm.engine.host_memory import pinned
from batchllm.layers.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: steps of 16 up to 512, where a decode step's matmuls pass the ridge point on a
    Hopper card and every padded row costs compute; steps of 64 above."""
    sizes = [1, 2, 4, 8] + list(range(16, 512, 16)) + list(range(512, 1025, 64))
    sizes = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(sizes))


def padding_table(cost: list[float], slack: float = 0.03, first: int = 0) -> list[int]:
    """For each size index i (sizes ascending, cost[i] its measured step time): the index to pad to, the
    cheapest size at or above i when it is more than `slack` cheaper than i itself (noise stays at i).
    Sizes before index `first` keep their own size (see DecodeGraphs.measure)."""
    table, best = list(range(len(cost))), len(cost) - 1
    for i in reversed(range(first, len(cost))):
        if cost[i] <= cost[best]:
            best = i
        table[i] = best if cost[best] < (1 - slack) * cost[i] else i
    return table


class DecodeGraphs:
    def __init__(self, model, device, max_num_seqs: int, max_blocks_per_seq: int, max_model_len: int):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, **i32)
        self.block_table = torch.zeros((n, max_blocks_per_seq), **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)  # one query token per sequence
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.cost_ms: list[float] | None = None  # per size, after measure()
        self._pad = list(range(len(self.sizes)))  # size index -> the index it pads to (padding_table)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs],
            max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        # the side stream must see the static buffers and the KV caches that the default stream is still
        # filling (a 100 GB memset runs for a while): without this wait the warm-up read garbage block ids
        stream.wait_stream(torch.cuda.current_stream())
        for bs in reversed(self.sizes):
            args = (self.input_ids[:bs], self.positions[:bs], self._meta(bs))
            with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles the allocator
                self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self.outputs[bs] = self.model(*args)
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = g
        torch.cuda.synchronize()

    @torch.inference_mode()
    def measure(self, min_rows: int = 1, reps: int = 3) -> None:
        """Time each graph's replay with every row padding (matmuls at full size, attention on nothing) and
        set the padding table: ~3 replays a size, a few seconds for an 8B model. Batches under `min_rows`
        keep their own size: there the attention splits long contexts (split-KV) by the batch's size, which a
        replay on empty rows does not see, and a padded batch would split less."""
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cost = []
        for bs in self.sizes:
            self.graphs[bs].replay()  # warm
            start.record()
            for _ in range(reps):
                self.graphs[bs].replay()
            end.record()
            end.synchronize()
            cost.append(start.elapsed_time(end) / reps)
        self.cost_ms = cost
        self._pad = padding_table(cost, first=bisect.bisect_left(self.sizes, min_rows))

    def padded_size(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[self._pad[i]] if i < len(self.sizes) else None

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, seq_lens: np.ndarray,
            block_table: np.ndarray, pending=None) -> torch.Tensor:
        """Replay for n decode rows (all arrays host-side, n = len(input_ids)) -> hidden [n, hidden_size].
        pending: (row indices, token ids on the device) that replace those rows' input ids, or None."""
        n = len(input_ids)
        bs = self.padded_size(n)
        w = block_table.shape[1]
        self.input_ids[:n].copy_(pinned(input_ids), non_blocking=True)
        if pending is not None:
            self.input_ids[pending[0]] = pending[1]
        self.positions[:n].copy_(pinned(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(pinned(slot_mapping), non_blocking=True)
        self.seq_lens[:n].copy_(pinned(seq_lens, torch.int32), non_blocking=True)
        self.block_table[:n, :w].copy_(pinned(block_table), non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
