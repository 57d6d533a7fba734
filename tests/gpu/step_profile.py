"""Where one engine step's GPU time goes, by kernel: a decode step and a mixed step of the issue-3 workload.

    PYTHONPATH=$PWD python tests/gpu/step_profile.py [--model llama3-8b] [--decode 255] [--context 900]
        [--prompt 920]

Builds `--decode` running requests at about `--context` tokens each (prefilled first), times pure decode
steps, then adds one `--prompt`-token request so that the next step mixes its prefill with the decode rows,
as the 1000-prompt benchmark's 626 mixed steps do. Steps are timed back to back (the median of 3 runs of
5-10 steps, so that asynchronous scheduling overlaps as it does in a real run) and profiled apart; the
kernel table groups CUDA time by kernel name. Writes step_profile.json to $OUT (or out/).
"""
import argparse
import statistics
import time

import numpy as np
import torch

from batchllm import LLM, SamplingParams
from batchllm.engine.config import MIN_AUTO_SEQS
from batchllm.engine.request import Request, RequestStatus
from results import write_result  # tests/gpu/results.py, beside this script


def _kernel_table(prof, steps: int) -> list[dict]:
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cpu_time_total", 0)
        if t > 0 and e.key not in rows:
            rows[e.key] = {"kernel": e.key[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps}
    return sorted(rows.values(), key=lambda r: -r["ms_per_step"])


def _gaps(prof) -> dict:
    """Device idle time inside the profiled window: the gaps between one kernel's end and the next one's start
    on the GPU (all streams together), their total, and the largest with the kernels on either side."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA")
    if not kernels:
        return {}
    gaps, end, prev = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((start - end, prev, name))
        if stop >= end:
            end, prev = stop, name
    busy_span = kernels[-1][1] - kernels[0][0]
    gaps.sort(reverse=True)
    return {"span_ms": busy_span / 1e3, "idle_ms": sum(g for g, _, _ in gaps) / 1e3, "num_gaps": len(gaps),
            "largest": [{"us": round(g, 1), "after": a[:70], "before": b[:70]} for g, a, b in gaps[:8]]}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_steps(llm, k: int, before=None) -> float:
    """Wall ms a step over k back-to-back engine steps (scheduling, inputs, forward, sampling; with asynchronous
    scheduling each step is launched while the previous one runs), the GPU drained before and after."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(k):
        if before is not None:
            before()
        llm.step()
    _sync()
    return (time.perf_counter() - t0) * 1e3 / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--decode", type=int, default=255)
    ap.add_argument("--context", type=int, default=900)
    ap.add_argument("--prompt", type=int, default=920)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--tag", default="", help="step_profile<tag>.json")
    args = ap.parse_args()
    # the default cap, as in the runs before session 5, unless the rows asked for need more than its floor
    cap = args.decode + 1 if args.decode >= MIN_AUTO_SEQS else None
    llm = LLM(args.model, device=args.device, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
              max_num_seqs=cap)
    acts = [torch.profiler.ProfilerActivity.CUDA if args.device == "cuda" else torch.profiler.ProfilerActivity.CPU]
    vocab = llm.hf_config.vocab_size
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    for i in range(args.decode):
        llm.scheduler.add_request(Request(i, rng.integers(10, vocab - 10, args.context).tolist(), sp))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()
    out = {"model": args.model, "decode_rows": args.decode, "context": args.context, "prompt": args.prompt,
           "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization,
           "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}

    decode_ms = [_timed_steps(llm, 10) for _ in range(3)]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            llm.step()
        _sync()
    out["decode_step_ms"] = statistics.median(decode_ms)
    out["decode_kernels"] = _kernel_table(prof, 3)
    out["decode_gaps"] = _gaps(prof)

    added = iter(range(10_000, 20_000))

    def swap():  # as in the benchmark: one request ends, a new prompt takes its place in the next step
        llm.scheduler.finish_request(llm.scheduler.running[0], RequestStatus.FINISHED_LENGTH)
        llm.scheduler.add_request(Request(next(added), rng.integers(10, vocab - 10, args.prompt).tolist(), sp))

    mixed_ms = [_timed_steps(llm, 5, swap) for _ in range(3)]
    llm.runner.split_decodes = False  # the same steps with decode and prefill rows in one attention launch
    out["mixed_one_launch_step_ms"] = statistics.median([_timed_steps(llm, 5, swap) for _ in range(3)])
    llm.runner.split_decodes = True
    _sync()
    with torch.profiler.profile(activities=acts) as prof:
        swap()
        llm.step()
        _sync()
    out["mixed_step_ms"] = statistics.median(mixed_ms)
    out["mixed_kernels"] = _kernel_table(prof, 1)
    out["mixed_gaps"] = _gaps(prof)
    out["running"] = len(llm.scheduler.running)
    assert out["running"] == args.decode, out["running"]

    print(f"{out['card']}: {args.model} (kv {args.kv_cache_dtype}, quantization {args.quantization}), "
          f"{args.decode} decode rows at ~{args.context} tokens")
    print(f"mixed step with decode and prefill rows in one attention launch: {out['mixed_one_launch_step_ms']:.2f} ms")
    for name in ("decode", "mixed"):
        print(f"\n{name} step: {out[name + '_step_ms']:.2f} ms (wall, back to back, median of 3 runs)")
        total = sum(r["ms_per_step"] for r in out[name + "_kernels"])
        print(f"  kernels {total:.2f} ms of CUDA time a step")
        for r in out[name + "_kernels"][:18]:
            print(f"  {r['ms_per_step']:8.3f} ms  {r['calls_per_step']:6.1f}x  {r['kernel']}")
        g = out[name + "_gaps"]
        if g:
            print(f"  device idle {g['idle_ms']:.2f} ms of a {g['span_ms']:.2f} ms profiled span, {g['num_gaps']} gaps; largest:")
            for x in g["largest"]:
                print(f"    {x['us']:8.1f} us  after {x['after']}  before {x['before']}")
    write_result(f"step_profile{args.tag}.json", out)


if __name__ == "__main__":
    main()
