"""The pool of KV blocks: ref counts, an LRU free queue, and the hash -> block map of the prefix cache.

Plain Python, no torch. A block with ref_cnt 0 sits in the free queue but keeps its hash, so a later
request can still hit it; it loses the hash only when it is handed out again (eviction, least recently
freed first).
"""
from collections import OrderedDict


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple | None = None  # the tokens behind block_hash, to check a hit

    def __repr__(self):
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> None, in eviction order: the front is the least recently freed
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, KVBlock] = {}  # block hash -> block holding those tokens
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: int, token_ids) -> KVBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):  # a hash collision is a miss
            return None
        return block

    def touch(self, blocks):
        """Take a reference on cache hits; a hit that was free leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"allocate({n}) with {len(self.free_queue)} free blocks")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            b = self.blocks[block_id]
            if b.block_hash is not None:  # evict: the block's old contents are overwritten
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = b.token_ids = None
                self.num_evictions += 1
            b.ref_cnt = 1
            out.append(b)
        return out

    def free(self, blocks):
        """Drop one reference from each block, in the order given; blocks reaching 0 join the queue's tail."""
        for b in blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, b
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: int, token_ids) -> None:
        if block.block_hash is not None:
            return
        if block_hash in self.cached:  # the same tokens are cached in another block already
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for b in self.cached.values():
            b.block_hash = b.token_ids = None
        self.cached.clear()
