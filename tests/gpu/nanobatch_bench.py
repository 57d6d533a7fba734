"""Does a step run faster as two nano-batches on two streams, one's attention beside the other's matmuls?

The last lever named for issue 3's bf16 points (docs/benchmarks.md, session 8). An engine that runs one
kernel at a time cannot pass them; one that overlaps a step's bandwidth-bound attention with compute-bound
matmuls might. Within one batch they depend on each other, so the step is split in two (NanoFlow's
nano-batches): while B attends, A runs its matmuls, and the other way round. This times that on llama3-8b with
the engine's own layers and kernels (random weights, the engine's KV pool), every variant as one CUDA graph:

  mixed   D decode rows at ~C tokens of context plus one P-token prompt (the benchmark's mixed steps):
          B = the decode rows, A = the prompt
  decode  2 x D/2 decode rows (the benchmark's decode steps): B and A = the two halves

  serial     one batch, as the engine runs it (decode rows first, their own attention launch); also timed
             eager, launched back to back, as the engine runs its mixed steps
  staggered  two chains on two streams; their matmul phases take turns (A's after B's, B's next after A's),
             so that each attention runs beside the other chain's matmuls
  free       two chains on two streams, no order between them: the hardware interleaves as it can
  split      the two chains in turn on one stream: what splitting costs with no overlap at all

    PYTHONPATH=$PWD python tests/gpu/nanobatch_bench.py     # writes nanobatch_bench.json to $OUT (or out/)
"""
import argparse
import statistics

import numpy as np
import torch

from batchllm import LLM
from batchllm.engine.model_runner import _leading_ones
from batchllm.layers import fused
from batchllm.layers.attention import AttentionMetadata
from results import write_result  # tests/gpu/results.py, beside this script


class Chain:
    """One nano-batch's inputs and its forward, cut at attention as the model's layers are (pre, attend, post)."""

    def __init__(self, model, ids, positions, meta):
        self.m, self.ids, self.positions, self.meta = model.model, ids, positions, meta

    def start(self):
        self.x, self.rope = self.m.embed(self.ids, self.positions)
        self.residual = None

    def pre(self, i):
        self.qk, self.v, self.residual = self.m.layers[i].pre(self.rope, self.x, self.residual)

    def attend(self, i):
        self.o = self.m.layers[i].self_attn.attend(self.qk, self.v, self.meta)

    def post(self, i):
        self.x, self.residual = self.m.layers[i].post(self.o, self.residual)

    def finish(self):
        return self.m.norm(self.x, self.residual)[0]


def serial(model, ids, positions, meta):
    return model(ids, positions, meta)


def two_chains(a: Chain, b: Chain, staggered: bool, one_stream: bool = False):
    """B's layer, then A's, on streams of their own; with staggered, each chain's matmul phase (post of layer
    i-1 with pre of layer i) waits for the other chain's previous matmul phase, so they take turns and each
    attention overlaps the other's matmuls. one_stream: both on the current stream (no overlap)."""
    cur = torch.cuda.current_stream()
    sa, sb = (cur, cur) if one_stream else (torch.cuda.Stream(), torch.cuda.Stream())
    sa.wait_stream(cur)
    sb.wait_stream(cur)
    n = len(a.m.layers)
    last = None  # event after the latest matmul phase issued

    def phase(chain, stream, i):
        nonlocal last
        with torch.cuda.stream(stream):
            if staggered and last is not None:
                stream.wait_event(last)
            if i > 0:
                chain.post(i - 1)
            if i < n:
                chain.pre(i)
            ev = torch.cuda.Event()
            ev.record(stream)
            last = ev
            if i < n:
                chain.attend(i)

    with torch.cuda.stream(sb):
        b.start()
    with torch.cuda.stream(sa):
        a.start()
    for i in range(n + 1):
        phase(b, sb, i)
        phase(a, sa, i)
    outs = []
    for chain, stream in ((b, sb), (a, sa)):
        with torch.cuda.stream(stream):
            outs.append(chain.finish())
    cur.wait_stream(sa)
    cur.wait_stream(sb)
    return torch.cat(outs)  # B's rows first, as in the serial batch


def eager_ms(fn, iters: int) -> float:
    """Wall ms a call of fn over `iters` back-to-back calls, launched without a CUDA graph and without waiting
    between them (as the engine launches its mixed steps)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def graph_ms(fn, iters: int):
    """Capture fn into a CUDA graph (after warm-up runs) and time its replays: (median ms, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out.clone()


def metadata(q_lens, seq_lens, table, slots, device) -> AttentionMetadata:
    """The engine's metadata for sequences of these query and total lengths (decode rows first)."""
    t = lambda a, dt: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return AttentionMetadata(query_start_loc=t(np.concatenate([[0], np.cumsum(q_lens)]), torch.int32),
                             seq_lens=t(seq_lens, torch.int32), block_table=t(table, torch.int32),
                             slot_mapping=t(slots, torch.int64), max_query_len=int(q_lens.max()),
                             max_seq_len=int(seq_lens.max()), num_decodes=_leading_ones(q_lens))


class Pool:
    """Hands out KV blocks of the engine's pool, each sequence its own."""

    def __init__(self, num_blocks: int, block_size: int):
        self.next, self.num_blocks, self.block_size = 0, num_blocks, block_size

    def seqs(self, q_lens, seq_lens, device, vocab, rng):
        """Inputs and metadata of sequences with these query and total lengths (contexts already cached), and the
        host arrays behind the metadata (q_lens, seq_lens, block table, slots) for merge."""
        q_lens, seq_lens = np.asarray(q_lens), np.asarray(seq_lens)
        nblocks = -(-seq_lens // self.block_size)
        assert self.next + nblocks.sum() <= self.num_blocks, "KV pool too small for this case"
        table = np.zeros((len(q_lens), int(nblocks.max())), dtype=np.int32)
        for r, nb in enumerate(nblocks):
            table[r, :nb] = np.arange(self.next, self.next + nb)
            self.next += int(nb)
        qsl = np.concatenate([[0], np.cumsum(q_lens)])
        row = np.repeat(np.arange(len(q_lens)), q_lens)
        positions = np.arange(qsl[-1]) - np.repeat(qsl[:-1], q_lens) + np.repeat(seq_lens - q_lens, q_lens)
        slots = table[row, positions // self.block_size].astype(np.int64) * self.block_size + positions % self.block_size
        part = (q_lens, seq_lens, table, slots)
        ids = torch.tensor(rng.integers(10, vocab - 10, int(qsl[-1])), dtype=torch.int64, device=device)
        return ids, torch.tensor(positions, dtype=torch.int64, device=device), metadata(*part, device), part


def merge(parts):
    """One batch's (q_lens, seq_lens, table, slots) from parts whose blocks were handed out apart: decode rows first."""
    width = max(p[2].shape[1] for p in parts)
    table = np.concatenate([np.pad(p[2], ((0, 0), (0, width - p[2].shape[1]))) for p in parts])
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), table,
            np.concatenate([p[3] for p in parts]))


def case(llm, pool, rng, name, b_shape, a_shape, iters):
    """Time serial, staggered and free for chains B and A: each shape is (q_lens, seq_lens)."""
    dev, vocab, model = llm.runner.device, llm.hf_config.vocab_size, llm.runner.model
    ids_b, pos_b, meta_b, part_b = pool.seqs(*b_shape, dev, vocab, rng)
    ids_a, pos_a, meta_a, part_a = pool.seqs(*a_shape, dev, vocab, rng)
    both = metadata(*merge([part_b, part_a]), dev)
    ids, pos = torch.cat([ids_b, ids_a]), torch.cat([pos_b, pos_a])
    res = {"case": name, "rows_b": len(b_shape[0]), "tokens_b": int(np.sum(b_shape[0])),
           "rows_a": len(a_shape[0]), "tokens_a": int(np.sum(a_shape[0]))}
    with torch.inference_mode():
        res["serial_ms"], ref = graph_ms(lambda: serial(model, ids, pos, both), iters)
        res["serial_eager_ms"] = eager_ms(lambda: serial(model, ids, pos, both), iters)
        for variant, stag, one in (("staggered", True, False), ("free", False, False), ("split", False, True)):
            b, a = Chain(model, ids_b, pos_b, meta_b), Chain(model, ids_a, pos_a, meta_a)
            res[f"{variant}_ms"], out = graph_ms(lambda: two_chains(a, b, stag, one), iters)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            res[f"{variant}_max_rel_diff"] = err
            res[f"{variant}_gain"] = 1 - res[f"{variant}_ms"] / res["serial_ms"]
    print(f"{name}: serial {res['serial_ms']:.2f} ms (eager {res['serial_eager_ms']:.2f}); staggered {res['staggered_ms']:.2f} ms "
          f"({100 * res['staggered_gain']:+.1f}%, diff {res['staggered_max_rel_diff']:.1e}); free "
          f"{res['free_ms']:.2f} ms ({100 * res['free_gain']:+.1f}%, diff {res['free_max_rel_diff']:.1e}); split, one "
          f"stream {res['split_ms']:.2f} ms ({100 * res['split_gain']:+.1f}%)", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--decode", type=int, default=400, help="decode rows of the mixed case")
    ap.add_argument("--prompt", type=int, default=920, help="prompt tokens of the mixed case")
    ap.add_argument("--decode-only", type=int, default=424, help="rows of the decode case (two halves)")
    ap.add_argument("--context", type=int, default=900)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    llm = LLM(args.model, device="cuda", enforce_eager=True, max_num_seqs=512, kv_cache_dtype=args.kv_cache_dtype)
    fused.enable_compile()  # the kernels a non-eager engine runs (enforce_eager only skips graph capture here)
    rng = np.random.default_rng(0)
    runner = llm.runner
    out = {"card": torch.cuda.get_device_name(), "model": args.model, "kv_cache_dtype": args.kv_cache_dtype,
           "context": args.context, "torch": torch.__version__, "cases": []}
    c = args.context
    for name, b_shape, a_shape in (
        ("mixed", ([1] * args.decode, [c] * args.decode), ([args.prompt], [args.prompt])),
        ("mixed, 4 prompts", ([1] * args.decode, [c] * args.decode), ([args.prompt] * 4, [args.prompt] * 4)),
        ("decode", ([1] * (args.decode_only // 2), [c] * (args.decode_only // 2)),
         ([1] * (args.decode_only - args.decode_only // 2), [c] * (args.decode_only - args.decode_only // 2))),
    ):
        pool = Pool(runner.num_kv_blocks, runner.block_size)  # blocks are reused between cases
        out["cases"].append(case(llm, pool, rng, name, b_shape, a_shape, args.iters))
    write_result("nanobatch_bench.json", out)


if __name__ == "__main__":
    main()
