"""The benchmark's engine side: random-token workloads, and running the engine on one while timing each step.

Where the time goes is measured by wrapping the engine at runtime (no engine change): `LLM.step` for the
step's wall time, `runner.execute` for launching the step, `runner.fetch` for the host's wait on the device,
and the scheduled batch to classify the step as decode (every scheduled request adds one token to a finished
prompt) or prefill/mixed. With asynchronous scheduling a `step()` call launches one step and collects the one
before; its wall time is booked to the step it collects, whose device time it mostly is. The same per-step
record feeds the roofline (bench_roofline.py); the HF baseline is in bench_hf.py.
"""
import time
from dataclasses import dataclass, field

import numpy as np


# -- workload ----------------------------------------------------------------------------------
def make_workload(vocab: int, num: int, input_len, output_len, seed: int = 0):
    """input_len/output_len: an int or an (lo, hi) inclusive range. -> (prompts, output lens)."""
    rng = np.random.default_rng(seed)

    def lens(spec):
        if isinstance(spec, int):
            return [spec] * num
        return rng.integers(spec[0], spec[1] + 1, size=num).tolist()

    in_lens, out_lens = lens(input_len), lens(output_len)
    prompts = [rng.integers(10, max(vocab - 10, 11), size=n).tolist() for n in in_lens]
    return prompts, out_lens


def make_prefix_workload(vocab: int, num: int, prefix_len: int, unique_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shared = rng.integers(10, vocab - 10, size=prefix_len).tolist()
    return [shared + rng.integers(10, vocab - 10, size=unique_len).tolist() for _ in range(num)]


# -- timing the engine's steps -------------------------------------------------------------------
@dataclass
class StepRecord:
    decode: bool
    starts: np.ndarray  # [num_seqs] tokens already computed before this step
    q_lens: np.ndarray  # [num_seqs] tokens computed in this step
    num_sampled: int
    exec_s: float = 0.0
    step_s: float = 0.0


@dataclass
class StepTimer:
    """Wraps llm.step, llm.runner.execute and llm.runner._prepare on the instance; `remove()` undoes it."""
    llm: object
    profile: bool = False
    steps: list = field(default_factory=list)
    prepare_s: float = 0.0
    wait_s: float = 0.0
    peak_kv_usage: float = 0.0

    def __post_init__(self):
        llm, runner = self.llm, self.llm.runner
        step, execute, prepare, fetch = llm.step, runner.execute, runner._prepare, runner.fetch

        def timed_fetch(result):
            t0 = time.perf_counter()
            r = fetch(result)
            self.wait_s += time.perf_counter() - t0
            return r

        def timed_prepare(out):
            t0 = time.perf_counter()
            r = prepare(out)
            self.prepare_s += time.perf_counter() - t0
            return r

        def timed_execute(out):
            sched = out.scheduled
            starts = np.fromiter((r.num_computed_tokens for r, _ in sched), dtype=np.int64, count=len(sched))
            q = np.fromiter((n for _, n in sched), dtype=np.int64, count=len(sched))
            ends = np.fromiter((r.num_tokens for r, _ in sched), dtype=np.int64, count=len(sched))
            prompts = np.fromiter((r.num_prompt_tokens for r, _ in sched), dtype=np.int64, count=len(sched))
            rec = StepRecord(bool(((q == 1) & (starts >= prompts)).all()), starts, q, int((starts + q == ends).sum()))
            t0 = time.perf_counter()
            if self.profile:
                import torch

                with torch.profiler.record_function("bench.decode" if rec.decode else "bench.prefill"):
                    r = execute(out)
            else:
                r = execute(out)
            rec.exec_s = time.perf_counter() - t0
            self.steps.append(rec)
            return r

        def timed_step():
            n = len(self.steps)
            collects = self.steps[-1] if llm.async_scheduling and llm._inflight is not None else None
            t0 = time.perf_counter()
            done = step()
            dt = time.perf_counter() - t0
            if collects is None and len(self.steps) > n:  # synchronous, or the first step of a run
                collects = self.steps[-1]
            if collects is not None:
                collects.step_s += dt
            self.peak_kv_usage = max(self.peak_kv_usage, llm.kv.usage())
            return done

        llm.step, runner.execute, runner._prepare, runner.fetch = timed_step, timed_execute, timed_prepare, timed_fetch

    def remove(self):
        for obj, name in ((self.llm, "step"), (self.llm.runner, "execute"), (self.llm.runner, "_prepare"),
                          (self.llm.runner, "fetch")):
            obj.__dict__.pop(name, None)

    def split(self) -> dict:
        dec = [s for s in self.steps if s.decode]
        pre = [s for s in self.steps if not s.decode]
        step_s = sum(s.step_s for s in self.steps)
        exec_s = sum(s.exec_s for s in self.steps)
        return {
            "num_steps": len(self.steps),
            "prefill_steps": len(pre), "decode_steps": len(dec),
            "prefill_s": sum(s.step_s for s in pre), "decode_s": sum(s.step_s for s in dec),
            "execute_s": exec_s,  # the model runner launching steps: inputs, forward, sampling
            "prepare_s": self.prepare_s,  # of which: building the step's input tensors on the host
            "wait_s": self.wait_s,  # the host waiting for the device's sampled tokens
            "scheduler_s": step_s - exec_s - self.wait_s,  # scheduling and bookkeeping
            "async_scheduling": self.llm.async_scheduling,
            "decode_batch_mean": float(np.mean([len(s.q_lens) for s in dec])) if dec else 0.0,
        }


def run_engine(llm, prompts, output_lens, warmup: int = 4, profile: bool = False, temperature: float = 0.0) -> dict:
    """Generate `prompts` (token ids) with ignore_eos, greedy or at `temperature`; -> throughput, step split,
    engine stats."""
    from batchllm.engine.sampling import SamplingParams

    if warmup:  # first-call costs (allocator, kernel compiles, graph capture) stay out of the figure
        wp, wo = make_workload(llm.hf_config.vocab_size, warmup, 16, 4, seed=12345)
        llm.generate(wp, [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in wo])
    sps = [SamplingParams(max_tokens=o, temperature=temperature, ignore_eos=True) for o in output_lens]
    before = llm.stats()
    timer = StepTimer(llm, profile=profile)
    prof = None
    if profile:
        prof = _start_profiler(llm.runner.device)
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    finally:
        timer.remove()
        if prof is not None:
            prof.__exit__(None, None, None)
    bad = [o for o in outs if o.finish_reason == "error" or len(o.token_ids) != sps[o.request_id].max_tokens]
    if bad:
        raise RuntimeError(f"request {bad[0].request_id} did not make its {sps[bad[0].request_id].max_tokens} "
                           f"tokens: {bad[0].finish_reason} {bad[0].error or ''}")
    after = llm.stats()
    d = {k: after[k] - before[k] for k in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                                            "prompt_tokens", "generation_tokens")}
    out_tokens, in_tokens = sum(output_lens), sum(len(p) for p in prompts)
    res = {
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + in_tokens) / elapsed,
        "requests_s": len(prompts) / elapsed,
        **timer.split(),
        "peak_kv_usage": timer.peak_kv_usage,
        "num_kv_blocks": after["num_kv_blocks"],
        "prefix_cache_queries": d["prefix_cache_queries"],
        "prefix_cache_hits": d["prefix_cache_hits"],
        "prefix_hit_rate": d["prefix_cache_hits"] / d["prefix_cache_queries"] if d["prefix_cache_queries"] else 0.0,
        "num_preemptions": d["num_preemptions"],
    }
    res["_steps"] = timer.steps  # for the roofline; dropped before JSON
    if prof is not None:
        res["_profile"] = prof
    return res


def _start_profiler(device):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    return prof


def profile_table(prof, device_type: str, rows: int = 25) -> str:
    key = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
