"""Asynchronous scheduling: step N+1 is scheduled and launched while step N's sampled tokens are PENDING.

It must change nothing a user sees: the same tokens, finish reasons, texts and logprobs as the synchronous
engine, through EOS, stop strings, stop token ids, max_tokens 1, seeds, chunked prefill, prefix hits and
preemption. On the CPU the device work is synchronous, but every piece of the pipeline runs: PENDING tokens,
inputs taken from the previous step's output tensor, late stops and the tokens dropped after them.
"""
import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.engine.kv_cache_manager import KVCacheManager
from batchllm.engine.request import PENDING, Request
from batchllm.engine.scheduler import Scheduler


def _workload(tokenizer_vocab=500, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, tokenizer_vocab, (40,), generator=g).tolist()
    prompts, params = [], []
    for i in range(n):
        tail = torch.randint(3, tokenizer_vocab, (int(torch.randint(3, 50, (1,), generator=g)),), generator=g).tolist()
        prompts.append((shared if i % 2 else []) + tail)
        kind = i % 6
        if kind == 0:
            params.append(SamplingParams(max_tokens=1, temperature=0))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=20, temperature=0, logprobs=2))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=16, temperature=0.8, seed=i, ignore_eos=True))
        elif kind == 3:
            params.append(SamplingParams(max_tokens=24, temperature=0, stop=["e"]))
        elif kind == 4:
            params.append(SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[100, 200, 300]))
        else:
            params.append(SamplingParams(max_tokens=30, temperature=0))
    return prompts, params


def _run(tiny_model_dir, async_scheduling, eos=None, device="cpu", seed=0, **engine_args):
    llm = LLM(tiny_model_dir, device=device, dtype="float32", async_scheduling=async_scheduling, **engine_args)
    if eos is not None:
        llm.scheduler.eos_token_ids = frozenset(eos)
    prompts, params = _workload(seed=seed)
    outs = llm.generate(prompts, params)
    # not num_cached_tokens: prefix hits depend on when blocks are registered and evicted, which differs
    return [(o.token_ids, o.finish_reason, o.text, o.logprobs) for o in outs], llm.stats()


def _most_made(outputs, k: int) -> list[int]:
    """The k tokens the engine made most often in `outputs` (_run's), as EOS that stops requests at many steps."""
    counts = {}
    for toks, *_ in outputs:
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=counts.get)[-k:]


def _differ(a, b, atol: float) -> bool:
    """Whether two outputs differ: tokens, finish reason, text and logprob keys exactly, logprob values by atol.

    On CUDA the two engines batch differently (async carries a stopped request one step longer), and cuBLAS
    picks its kernel by batch size, so fp32 logits move in the last bits; on the CPU they must be equal."""
    if a[:3] != b[:3] or (a[3] is None) != (b[3] is None):
        return True
    return a[3] is not None and any(x.keys() != y.keys() or any(abs(x[k] - y[k]) > atol for k in x)
                                    for x, y in zip(a[3], b[3], strict=True))


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_async_matches_sync(tiny_model_dir, device):
    # EOS: two tokens the greedy model makes often, so that requests stop at many different steps
    free, _ = _run(tiny_model_dir, False, eos=[], device=device, num_kv_blocks=256)
    eos = _most_made(free, 2)
    # a small pool and budget: preemption, chunked prefill and mixed steps
    args = dict(eos=eos, device=device, num_kv_blocks=24, block_size=8, max_num_batched_tokens=64, max_num_seqs=8)
    if device == "cuda":  # a warm-up of the same shapes: kernels compiled or tuned on first use are settled
        _run(tiny_model_dir, False, **args)
    sync, sync_stats = _run(tiny_model_dir, False, **args)
    asyn, async_stats = _run(tiny_model_dir, True, **args)
    atol = 1e-4 if device == "cuda" else 0.0
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(asyn, sync)) if _differ(a, b, atol)]
    assert not diff, f"{len(diff)} outputs differ; first: #{diff[0][0]} async {diff[0][1]} sync {diff[0][2]}"
    reasons = {r for _, r, *_ in sync}
    assert reasons == {"stop", "length"}
    assert any(r == "stop" and lp is None and len(t) < 30 for t, r, _, lp in sync)  # an EOS or stop string
    assert async_stats["num_preemptions"] > 0 and async_stats["prefix_cache_hits"] > 0
    assert async_stats["generation_tokens"] == sync_stats["generation_tokens"]
    assert not any(PENDING in toks for toks, *_ in asyn)


@pytest.mark.parametrize("seed, block_size, budget, blocks, seqs", [
    (1, 16, 32, 16, 4), (2, 8, 128, 40, 8), (3, 8, 48, 20, 6), (4, 16, 256, 64, 16)])
def test_async_matches_sync_across_settings(tiny_model_dir, seed, block_size, budget, blocks, seqs):
    free, _ = _run(tiny_model_dir, False, eos=[], seed=seed, num_kv_blocks=256)
    args = dict(eos=_most_made(free, 1), seed=seed, num_kv_blocks=blocks, block_size=block_size,
                max_num_batched_tokens=budget, max_num_seqs=seqs)
    sync, _ = _run(tiny_model_dir, False, **args)
    asyn, _ = _run(tiny_model_dir, True, **args)
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(asyn, sync)) if a != b]
    assert not diff, f"{len(diff)} outputs differ; first: #{diff[0][0]} async {diff[0][1][:2]} sync {diff[0][2][:2]}"


def test_next_step_launches_before_tokens_return(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", num_kv_blocks=64, async_scheduling=True)
    llm.scheduler.add_request(Request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert llm.step() == []  # step 1 (the prompt) launched; nothing collected yet
    req = llm.scheduler.running[0]
    assert req.token_ids[-1] == PENDING
    assert llm.step() == []  # step 2 launched on the device's copy of step 1's token, then step 1 collected
    assert req.token_ids[3] != PENDING and req.token_ids[4] == PENDING
    assert llm.step() == []  # step 3: the last token (max_tokens 3), so the request leaves the running set
    assert not llm.scheduler.running and req.has_pending
    [out] = llm.step()  # nothing left to launch: step 3 is collected
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and not llm.has_unfinished()
    sync = LLM(tiny_model_dir, device="cpu", dtype="float32", num_kv_blocks=64, async_scheduling=False)
    assert sync.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids == out.token_ids


def test_block_with_a_pending_token_is_cached_once_known():
    s = Scheduler(KVCacheManager(16, 4, True), 4, 64, max_model_len=100, eos_token_ids=[0])
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    s.add_request(a)
    first = s.update_after_launch(s.schedule())  # the prompt; its first token is PENDING at index 3
    s.update_after_launch(s.schedule())  # computes index 3: block 0 is full, but one of its tokens is unknown
    assert a.token_ids == [1, 2, 3, PENDING, PENDING]
    assert s.kv.num_cached_block.get("a", 0) == 0
    s.update_from_output(first, [9])
    s.schedule()
    assert s.kv.num_cached_block["a"] == 1
    block = s.kv.req_blocks["a"][0]
    assert block.token_ids == (1, 2, 3, 9)


def test_eos_found_late_drops_the_token_after_it():
    s = Scheduler(KVCacheManager(16, 4, True), 4, 64, max_model_len=100, eos_token_ids=[0])
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    s.add_request(a)
    first = s.update_after_launch(s.schedule())
    second = s.update_after_launch(s.schedule())  # launched before the first token is known
    assert s.update_from_output(first, [0]) == [a]  # EOS
    assert a.status.finished and a.output_token_ids == [0]
    assert s.update_from_output(second, [7]) == []  # sampled after the stop: dropped
    assert a.output_token_ids == [0] and not s.has_unfinished() and s.kv.pool.num_free_blocks == 16
