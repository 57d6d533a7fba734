"""Per-shard checkpoints: which parts are committed and which rows they hold.

OUTPUT/_batchllm/checkpoints/shard-00003.json is rewritten atomically after each part:
  {"shard", "fingerprint", "rows", "complete", "parts": [{"seq", "results", "errors", "rows": [[a, b), ...],
   "num_ok", "num_error", "prompt_tokens", "completion_tokens", "seconds"}]}
The engine finishes rows out of order, so a part records its rows as ranges of shard ordinals; a restarted
worker skips every committed row and resumes with the rest. The commit order is: data files first, then
the checkpoint. A data file of this shard that no checkpoint names (the worker died between the two) is an
orphan; it can only carry the next part number, and the next worker on the shard deletes it before it
starts, so each row lands exactly once.
"""
import bisect
import time

CHECKPOINT_DIR = "_batchllm/checkpoints"


class RangeSet:
    """A set of ints kept as sorted, disjoint, merged [start, end) ranges."""

    def __init__(self, ranges=()):
        self.starts, self.ends = [], []
        for a, b in sorted(ranges):
            self.add_range(a, b)

    def add_range(self, a, b):
        if a >= b:
            return
        i = bisect.bisect_left(self.ends, a)  # first range that ends at or after a
        j = bisect.bisect_right(self.starts, b)  # ranges from i to j-1 touch [a, b)
        if i < j:
            a = min(a, self.starts[i])
            b = max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def add(self, x):
        self.add_range(x, x + 1)

    def __call__(self, x) -> bool:
        i = bisect.bisect_right(self.starts, x) - 1
        return i >= 0 and x < self.ends[i]

    __contains__ = __call__

    def covers(self, a, b) -> bool:
        """Whether every int in [a, b) is in the set."""
        if a >= b:
            return True
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b

    def __len__(self):
        return sum(b - a for a, b in zip(self.starts, self.ends))

    def ranges(self):
        return [[a, b] for a, b in zip(self.starts, self.ends)]


def ranges_of(ordinals) -> list:
    s = RangeSet()
    for x in ordinals:
        s.add(x)
    return s.ranges()


def part_name(kind: str, shard: int, seq: int, ext: str) -> str:
    return f"{kind}/part-{shard:05d}-{seq:05d}.{ext}"


class ShardCheckpoint:
    def __init__(self, store, shard: int, fingerprint: str, rows: int):
        self.store, self.shard, self.fingerprint, self.rows = store, shard, fingerprint, rows
        self.parts, self.complete = [], False
        self.committed = RangeSet()

    @property
    def rel(self):
        return f"{CHECKPOINT_DIR}/shard-{self.shard:05d}.json"

    @classmethod
    def load(cls, store, shard: int, fingerprint: str, rows: int):
        ck = cls(store, shard, fingerprint, rows)
        doc = store.read_json(ck.rel)
        if doc is not None and doc.get("fingerprint") == fingerprint:
            ck.parts = doc["parts"]
            ck.complete = bool(doc.get("complete"))
            for p in ck.parts:
                for a, b in p["rows"]:
                    ck.committed.add_range(a, b)
        return ck

    def totals(self) -> dict:
        keys = ("num_ok", "num_error", "prompt_tokens", "completion_tokens", "seconds")
        return {k: sum(p.get(k, 0) for p in self.parts) for k in keys}

    def next_seq(self) -> int:
        return max((p["seq"] for p in self.parts), default=-1) + 1

    def remove_orphans(self) -> list:
        """Delete data files of this shard that no committed part names; returns their names.

        Parts are written in sequence and each is recorded before the next is written, so an orphan can
        only carry the next sequence number: a few existence checks, no listing of results/.
        """
        seq = self.next_seq()
        removed = []
        for kind in ("results", "errors"):
            for ext in ("parquet", "jsonl"):
                rel = part_name(kind, self.shard, seq, ext)
                if self.store.exists(rel):
                    self.store.remove(rel)
                    removed.append(rel)
        return removed

    def add_part(self, part: dict, complete: bool = False) -> None:
        """Record a part whose data files are already committed, then commit the checkpoint."""
        self.parts.append(part)
        for a, b in part["rows"]:
            self.committed.add_range(a, b)
        self.complete = complete
        self.save()

    def mark_complete(self) -> None:
        self.complete = True
        self.save()

    def save(self) -> None:
        self.store.write_json(self.rel, {
            "shard": self.shard, "fingerprint": self.fingerprint, "rows": self.rows,
            "complete": self.complete, "parts": self.parts, "updated": time.time(),
        })


def load_all(store, plan) -> list:
    """The checkpoint of every shard in the plan (empty ones for shards not started)."""
    return [ShardCheckpoint.load(store, s["index"], plan["fingerprint"], s["rows"]) for s in plan["shards"]]
