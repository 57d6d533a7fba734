"""KV cache manager: which blocks each request holds, prefix-cache lookups, and in-flight sharing.

Plain Python, no torch. The scheduler asks `get_computed_blocks` (prefix hits) and `allocate_slots`
(room for this step's tokens), and calls `free` on finish or preemption.

Prefix caching: each full block's hash chains on its parent's and on a key for the model and its
quantization. A block is registered in the cache when the step that fills it is scheduled: within one
forward pass every layer writes all new K/V before any attention reads, so a request scheduled later in
the same step may already read it. A request is never served its last prompt block from the cache: at
least one token must run to give logits.

In-flight sharing: when the next block a waiting request needs is one that a running request will
compute in a later step (its prompt is still being chunked in), `blocks_pending` says so and the
scheduler lets the waiting request wait for it rather than compute the same tokens twice.
"""
from batchllm.engine.block_pool import BlockPool, KVBlock
from batchllm.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, cache_key: str = ""):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.key = hash(("batchllm", cache_key))
        self.req_blocks: dict[object, list[KVBlock]] = {}
        self.num_cached_block: dict[object, int] = {}  # leading blocks of each request already in the cache
        self.inflight: dict[int, int] = {}  # block hash -> running requests that will compute it
        self.req_inflight: dict[object, set[int]] = {}
        self.prefix_cache_queries = 0  # tokens looked up, at each request's first schedule
        self.prefix_cache_hits = 0  # tokens found

    # -- hashes --------------------------------------------------------------------------------
    def _block_tokens(self, req: Request, i: int):
        return req.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def _ensure_hashes(self, req: Request, num_blocks: int) -> None:
        hashes = req.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.key
            hashes.append(hash((parent, tuple(self._block_tokens(req, i)))))

    # -- lookups -------------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks at the start of req's tokens, and the tokens they cover."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size  # keep >= 1 token to compute
        self._ensure_hashes(req, max_blocks)
        hits = []
        for i in range(max_blocks):
            b = self.pool.get_cached_block(req.block_hashes[i], self._block_tokens(req, i))
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    def blocks_pending(self, req: Request, num_hit_blocks: int) -> bool:
        """True when req's next block is being computed by a running request (so req should wait)."""
        if not self.enable_caching or num_hit_blocks >= (req.num_tokens - 1) // self.block_size:
            return False
        return self.inflight.get(req.block_hashes[num_hit_blocks], 0) > 0

    # -- allocation ----------------------------------------------------------------------------
    def num_blocks_needed(self, req: Request, num_new_tokens: int, num_new_computed: int = 0) -> int:
        held = len(self.req_blocks.get(req.request_id, ()))
        total = -(-(req.num_computed_tokens + num_new_computed * self.block_size + num_new_tokens) // self.block_size)
        return max(0, total - held - num_new_computed)

    def can_allocate(self, req: Request, num_new_tokens: int, new_computed_blocks=()) -> bool:
        n = self.num_blocks_needed(req, num_new_tokens, len(new_computed_blocks))
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)  # hits now in the free queue
        return n <= self.pool.num_free_blocks - reclaimed

    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed_blocks=()) -> bool:
        """Give req blocks for num_new_tokens more tokens (after any prefix hits); False if there is no room."""
        if not new_computed_blocks:  # the common decode case, 15 steps in 16: no new block, none newly full
            held = self.req_blocks.get(req.request_id)
            end = req.num_computed_tokens + num_new_tokens
            full = end // self.block_size
            if (held is not None and end <= len(held) * self.block_size
                    and (not self.enable_caching or full <= self.num_cached_block.get(req.request_id, 0))):
                return True
        if not self.can_allocate(req, num_new_tokens, new_computed_blocks):
            return False
        first = req.request_id not in self.req_blocks
        blocks = self.req_blocks.setdefault(req.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            req.block_ids.extend(b.block_id for b in new_computed_blocks)
            req.num_computed_tokens += len(new_computed_blocks) * self.block_size
        if first:
            self._track_inflight(req, len(blocks))
        n = self.num_blocks_needed(req, num_new_tokens)
        if n:
            new = self.pool.allocate(n)
            blocks.extend(new)
            req.block_ids.extend(b.block_id for b in new)
        if self.enable_caching:
            self._cache_full_blocks(req, blocks, (req.num_computed_tokens + num_new_tokens) // self.block_size)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[KVBlock], num_full: int) -> None:
        if req.has_pending:  # a block is hashed once all its tokens are known: a later step registers this one
            num_full = min(num_full, (req.num_tokens - 1) // self.block_size)
        start = self.num_cached_block.get(req.request_id, 0)
        if num_full <= start:
            return
        self._ensure_hashes(req, num_full)
        pending = self.req_inflight.get(req.request_id)
        self.num_cached_block[req.request_id] = num_full
        for i in range(start, num_full):
            b = blocks[i]
            if b.block_hash is None:
                h = req.block_hashes[i]
                self.pool.cache_block(b, h, self._block_tokens(req, i))
            if pending and req.block_hashes[i] in pending:
                self._untrack(req.request_id, req.block_hashes[i])

    def _track_inflight(self, req: Request, num_hit_blocks: int) -> None:
        if not self.enable_caching:
            return
        num_prompt_blocks = req.num_prompt_tokens // self.block_size
        self._ensure_hashes(req, num_prompt_blocks)
        todo = set(req.block_hashes[num_hit_blocks:num_prompt_blocks])
        self.req_inflight[req.request_id] = todo
        for h in todo:
            self.inflight[h] = self.inflight.get(h, 0) + 1

    def _untrack(self, request_id, h: int) -> None:
        self.req_inflight[request_id].discard(h)
        self._release(h)

    def _release(self, h: int) -> None:
        if self.inflight[h] <= 1:
            del self.inflight[h]
        else:
            self.inflight[h] -= 1

    def record_first_schedule(self, req: Request, num_hit_tokens: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit_tokens
            if self.enable_caching:
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += num_hit_tokens

    def free(self, req: Request) -> None:
        """Release req's blocks, tail first so that a request's last blocks are evicted before its first."""
        blocks = self.req_blocks.pop(req.request_id, [])
        self.num_cached_block.pop(req.request_id, None)
        self.pool.free(reversed(blocks))
        for h in self.req_inflight.pop(req.request_id, ()):
            self._release(h)
        req.block_ids = []

    def usage(self) -> float:
        return self.pool.usage()
