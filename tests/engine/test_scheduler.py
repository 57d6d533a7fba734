"""Scheduler on the CPU without a model: token budget, chunked prefill, mixed steps, preemption, waiting
for in-flight prefix blocks. Sampled tokens are made up; only the bookkeeping is under test."""
from batchllm.engine.kv_cache_manager import KVCacheManager
from batchllm.engine.request import Request, RequestStatus
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.scheduler import Scheduler


def make(num_blocks=16, block_size=4, budget=8, max_num_seqs=4, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, max_num_seqs, budget, max_model_len=1000, eos_token_ids=[0])


def run_step(s, token=7):
    out = s.schedule()
    sampling = s.update_after_launch(out)
    s.update_from_output(sampling, [token] * len(sampling))
    return out


def test_chunked_prefill_then_mixed_decode():
    s = make(budget=8)
    a = Request("a", list(range(1, 13)), SamplingParams(max_tokens=3, ignore_eos=True))
    b = Request("b", list(range(20, 23)), SamplingParams(max_tokens=3, ignore_eos=True))
    s.add_request(a)
    s.add_request(b)
    out = run_step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 8)]  # the budget cuts a's prompt
    out = run_step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 4), ("b", 3)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1
    out = run_step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 1)]  # both decode


def test_preemption_frees_the_latest_and_recomputes():
    s = make(num_blocks=6, block_size=4, budget=64, caching=False)
    a = Request("a", list(range(1, 9)), SamplingParams(max_tokens=8, ignore_eos=True))  # 2 blocks
    b = Request("b", list(range(11, 19)), SamplingParams(max_tokens=8, ignore_eos=True))  # 2 blocks
    c = Request("c", list(range(21, 29)), SamplingParams(max_tokens=8, ignore_eos=True))  # 2 blocks
    for r in (a, b, c):
        s.add_request(r)
    run_step(s)
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2, 3], [4, 5])
    out = run_step(s)  # each needs a third block for token 9: c is preempted and its blocks go to a and b
    assert [r.request_id for r in out.preempted] == ["c"]
    assert c.status == RequestStatus.WAITING and c.num_computed_tokens == 0 and c.block_ids == []
    assert a.block_ids == [0, 1, 5] and b.block_ids == [2, 3, 4]
    assert s.num_preemptions == 1
    assert c.num_output_tokens == 1  # its sampled token is kept and recomputed later
    while s.has_unfinished():
        run_step(s)
    assert all(r.num_output_tokens == 8 for r in (a, b, c))
    assert s.kv.pool.num_free_blocks == 6


def test_single_request_needing_most_of_the_pool_finishes():
    s = make(num_blocks=8, block_size=4, budget=16, caching=False)
    big = Request("big", list(range(1, 25)), SamplingParams(max_tokens=7, ignore_eos=True))  # 31 of 32 slots
    small = [Request(f"s{i}", [i + 1] * 5, SamplingParams(max_tokens=6, ignore_eos=True)) for i in range(3)]
    s.add_request(big)
    for r in small:
        s.add_request(r)
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < 200
    assert big.num_output_tokens == 7 and all(r.num_output_tokens == 6 for r in small)


def test_eos_and_stop_token_ids_finish():
    s = make()
    a = Request("a", [5, 6], SamplingParams(max_tokens=10))
    s.add_request(a)
    run_step(s, token=0)  # eos
    assert a.status == RequestStatus.FINISHED_STOPPED and not s.has_unfinished()
    b = Request("b", [5, 6], SamplingParams(max_tokens=10, stop_token_ids=[9]))
    s.add_request(b)
    run_step(s, token=9)
    assert b.status == RequestStatus.FINISHED_STOPPED
    c = Request("c", [5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
    s.add_request(c)
    run_step(s, token=0)
    run_step(s, token=0)
    assert c.status == RequestStatus.FINISHED_LENGTH and c.output_token_ids == [0, 0]


def test_waiting_request_waits_for_inflight_prefix():
    s = make(num_blocks=32, block_size=4, budget=8, max_num_seqs=8)
    shared = list(range(1, 17))
    a = Request("a", shared + [100], SamplingParams(max_tokens=1))
    b = Request("b", shared + [200], SamplingParams(max_tokens=1))
    s.add_request(a)
    s.add_request(b)
    out = run_step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["a"]  # b waits: a computes the shared blocks
    out = run_step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["a"]
    out = run_step(s)  # a's last token and b, which now hits all 4 shared blocks
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 1)]
    assert b.num_cached_tokens == 16
