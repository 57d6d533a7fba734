"""Result and error parts: rows buffered in memory, then written as one Parquet or JSONL file each.

Every part file is committed whole (Store.put_atomic) under results/ or errors/, so
pyarrow.dataset.dataset(OUTPUT + "/results") only ever sees complete files. Results and errors have a
fixed schema per job (from the plan), so every part of a dataset agrees.
"""
import base64
import io
import json
import time

import pyarrow as pa

from batchllm.runner.checkpoint import part_name, ranges_of

TAIL_FIELDS = [("output", pa.string()), ("finish_reason", pa.string()),
               ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())]


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def results_schema(key_schema: pa.Schema) -> pa.Schema:
    """id + copied columns (from the plan) + the generated fields."""
    return pa.schema(list(key_schema) + [pa.field(n, t) for n, t in TAIL_FIELDS])


def errors_schema(key_schema: pa.Schema) -> pa.Schema:
    return pa.schema([key_schema.field("id"), pa.field("row", pa.int64()),
                      pa.field("error_type", pa.string()), pa.field("message", pa.string())])


def _convert(value, typ):
    """A JSON value made to fit a plan column type (JSONL has no schema); None when it cannot."""
    if value is None:
        return None
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if pa.types.is_boolean(typ):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(typ):
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    if pa.types.is_floating(typ):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value


class PartWriter:
    """Buffers one shard's finished rows and commits them as numbered parts.

    kind "table": records are dicts of schema columns (Parquet or JSONL files);
    kind "openai": records are OpenAI batch output lines (JSONL files).
    """

    def __init__(self, store, shard: int, kind: str, fmt: str, key_schema: pa.Schema = None, convert=False):
        self.store, self.shard, self.kind, self.fmt = store, shard, kind, fmt
        self.ext = "parquet" if fmt == "parquet" else "jsonl"
        self.convert = convert
        if kind == "table":
            self.schemas = {"results": results_schema(key_schema), "errors": errors_schema(key_schema)}
        self.buffers = {"results": [], "errors": []}
        self.ordinals = []
        self.prompt_tokens = self.completion_tokens = 0
        self.started = time.monotonic()

    @property
    def num_pending(self) -> int:
        return len(self.ordinals)

    def add_result(self, ordinal: int, record: dict, prompt_tokens: int, completion_tokens: int):
        self.buffers["results"].append(record)
        self.ordinals.append(ordinal)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def add_error(self, ordinal: int, record: dict):
        self.buffers["errors"].append(record)
        self.ordinals.append(ordinal)

    def _encode(self, which: str, records: list) -> bytes:
        if self.kind == "openai" or self.fmt == "jsonl":
            return "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records).encode()
        import pyarrow.parquet as pq

        schema = self.schemas[which]
        columns = {}
        for field in schema:
            values = [r.get(field.name) for r in records]
            if self.convert:
                values = [_convert(v, field.type) for v in values]
            columns[field.name] = values
        table = pa.Table.from_pydict(columns, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    def commit(self, seq: int) -> dict:
        """Write the buffered rows as part `seq` (data files only) and return its checkpoint entry."""
        part = {"seq": seq, "results": None, "errors": None, "rows": ranges_of(self.ordinals),
                "num_ok": len(self.buffers["results"]), "num_error": len(self.buffers["errors"]),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        for which in ("results", "errors"):
            records = self.buffers[which]
            if records:
                rel = part_name(which, self.shard, seq, self.ext)
                self.store.put_atomic(rel, self._encode(which, records))
                part[which] = rel
        now = time.monotonic()
        part["seconds"] = round(now - self.started, 3)
        self.started = now
        self.buffers = {"results": [], "errors": []}
        self.ordinals = []
        self.prompt_tokens = self.completion_tokens = 0
        return part
