"""Block pool and KV cache manager: exact block ids for allocation, hits, ref counts, eviction order, frees."""
from batchllm.engine.block_pool import BlockPool
from batchllm.engine.kv_cache_manager import KVCacheManager
from batchllm.engine.request import Request
from batchllm.engine.sampling import SamplingParams

SP = SamplingParams(max_tokens=4)


def req(rid, tokens):
    return Request(rid, tokens, SP)


def ids(blocks):
    return [b.block_id for b in blocks]


def test_pool_allocates_in_order_and_frees_to_tail():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert ids(a) == [0, 1] and ids(b) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    pool.free(reversed(a))
    assert list(pool.free_queue) == [5, 1, 0]
    assert ids(pool.allocate(2)) == [5, 1]


def test_allocation_hit_refcounts_and_eviction_order():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    assert sorted(kv.pool.cached[h].block_id for h in kv.pool.cached) == [0, 1]  # only full blocks are hashed

    b = req("b", list(range(8)) + [50, 51, 52])
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1] and n == 8
    assert kv.allocate_slots(b, 3, hits)
    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]

    kv.free(a)  # tail first: block 2 reaches 0, blocks 1 and 0 are still held by b
    assert list(kv.pool.free_queue) == [4, 5, 6, 7, 8, 9, 2]
    kv.free(b)
    assert list(kv.pool.free_queue) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [0, 0, 0, 0]

    # a freed block keeps its hash: a request with a's prefix still hits blocks 0 and 1
    c = req("c", list(range(8)) + [70])
    hits, n = kv.get_computed_blocks(c)
    assert ids(hits) == [0, 1] and n == 8

    # LRU eviction: a large unrelated request takes the least recently freed blocks first
    d = req("d", [100 + i for i in range(32)])
    assert kv.allocate_slots(d, 32)
    assert d.block_ids == [4, 5, 6, 7, 8, 9, 2, 3]
    assert list(kv.pool.free_queue) == [1, 0]
    e = req("e", [200 + i for i in range(4)])
    assert kv.allocate_slots(e, 4)
    assert e.block_ids == [1]  # block 1 evicted: its hash is gone
    hits, n = kv.get_computed_blocks(c)
    assert ids(hits) == [0] and n == 4  # the chain breaks at the evicted block


def test_last_prompt_block_never_served_from_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    kv.free(a)
    same = req("same", list(range(8)))  # identical 8 tokens: only the first block may hit
    hits, n = kv.get_computed_blocks(same)
    assert ids(hits) == [0] and n == 4


def test_can_allocate_counts_free_hits():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)  # blocks 0, 1, 2
    kv.free(a)
    b = req("b", list(range(8)) + [99, 98, 97, 96, 95])  # hits 0, 1; needs 2 more blocks, only 1 is free
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1]
    assert not kv.can_allocate(b, 5, hits)
    assert not kv.allocate_slots(b, 5, hits)
    assert [kv.pool.blocks[i].ref_cnt for i in range(3)] == [0, 0, 0]  # a failed allocation takes nothing
    assert kv.allocate_slots(b, 4, hits)
    assert b.block_ids == [0, 1, 2]


def test_inflight_blocks_make_a_request_wait():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    shared = list(range(16))
    a = req("a", shared + [1000])
    assert kv.allocate_slots(a, 4)  # only the first chunk (one block) is computed this step
    b = req("b", shared + [2000])
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [0] and n == 4
    assert kv.blocks_pending(b, len(hits))  # a will compute blocks 1..3: b waits
    a.num_computed_tokens = 4
    assert kv.allocate_slots(a, 13)
    hits, n = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1, 2, 3] and n == 16
    assert not kv.blocks_pending(b, len(hits))
    kv.free(a)
    assert kv.inflight == {}


def test_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    a = req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert kv.pool.cached == {}
