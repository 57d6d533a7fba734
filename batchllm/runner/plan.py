"""The plan: the job's shards, fixed once and stored at OUTPUT/_batchllm/plan.json.

Shard s belongs to worker s % compute.workers. Every worker reads the same plan, so a restarted worker
finds its shards (and their checkpoints) again. A plan is made from file listings and metadata (Parquet)
or one streaming pass (JSONL); with the same inputs it comes out the same, so workers that start
without one (no `submit`, e.g. a Kubernetes Indexed Job) can each make it and agree.
"""
import time

import pyarrow as pa

from batchllm.runner import dataset
from batchllm.runner.openai_batch import parse_request
from batchllm.runner.prompts import PromptBuilder, RowError
from batchllm.runner.spec import SpecError, format_conflict
from batchllm.runner.writer import schema_from_b64, schema_to_b64

PLAN = "_batchllm/plan.json"
CHARS_PER_TOKEN = 4.0  # rough, model-independent; the plan's token numbers are estimates


def _jsonl_type(values):
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return pa.bool_()
    if kinds and kinds <= {int}:
        return pa.int64()
    if kinds and kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def _key_schema(spec, fmt, parquet_schema, sample):
    """Schema of id + copied input columns, the same for every part of the job."""
    id_col = spec.input.id_column
    fields = []
    if fmt == "openai-batch":
        return pa.schema([pa.field("id", pa.string())])
    names = parquet_schema.names if parquet_schema is not None else None
    for col, what in ([(id_col, "input.id_column")] if id_col else []) + [(c, "output.columns") for c in spec.output.columns]:
        if names is not None and col not in names:
            raise SpecError(f"{what}: column {col!r} is not in the dataset; columns are: {', '.join(names)}")
    if id_col is None:
        fields.append(pa.field("id", pa.int64()))
    elif parquet_schema is not None:
        fields.append(pa.field("id", parquet_schema.field(id_col).type))
    else:
        fields.append(pa.field("id", pa.string()))
    for col in spec.output.columns:
        if parquet_schema is not None:
            fields.append(pa.field(col, parquet_schema.field(col).type))
        else:
            fields.append(pa.field(col, _jsonl_type([r.get(col) for r in sample])))
    return pa.schema(fields)


def _prompt_chars(spec, fmt, sample) -> float:
    """Mean prompt length in characters over the sample rows that build."""
    sizes = []
    builder = PromptBuilder(spec.prompt) if fmt != "openai-batch" else None
    for row in sample:
        try:
            prompt = parse_request(row)[1] if builder is None else builder.build(row)
        except RowError:
            continue
        if isinstance(prompt, str):
            sizes.append(len(prompt))
        elif prompt and isinstance(prompt[0], dict):
            sizes.append(sum(len(m["content"]) + 4 * CHARS_PER_TOKEN for m in prompt))
        else:
            sizes.append(len(prompt) * CHARS_PER_TOKEN)
    return sum(sizes) / len(sizes) if sizes else 0.0


def make_plan(spec) -> dict:
    fs, paths = dataset.discover(spec.input, spec.storage)
    fmt = dataset.detect_format(fs, paths, spec.input.format)
    problem = format_conflict(spec, fmt)
    if problem:
        raise SpecError(problem)
    out_fmt = "jsonl" if fmt == "openai-batch" else (spec.output.format or "parquet")
    shards, parquet_schema = dataset.make_shards(fs, paths, fmt, spec.compute.rows_per_shard)
    sample = dataset.sample_rows(fs, shards, fmt)
    key_schema = _key_schema(spec, fmt, parquet_schema, sample)
    prompt_tokens = _prompt_chars(spec, fmt, sample) / CHARS_PER_TOKEN
    out = []
    for i, pieces in enumerate(shards):
        rows = sum(p["rows"] for p in pieces)
        out.append({"index": i, "rows": rows, "first_row": pieces[0]["first_row"], "pieces": pieces,
                    "est_prompt_tokens": int(rows * prompt_tokens),
                    "max_generation_tokens": rows * spec.sampling.max_tokens})
    return {
        "version": 1, "job": spec.name, "fingerprint": spec.fingerprint(), "created": time.time(),
        "input_uri": spec.input.uri, "output_uri": spec.output.uri, "format": fmt, "output_format": out_fmt,
        "files": len(paths), "total_rows": sum(s["rows"] for s in out), "key_schema": schema_to_b64(key_schema),
        "convert_columns": fmt == "jsonl", "shards": out,
    }


def key_schema(plan) -> pa.Schema:
    return schema_from_b64(plan["key_schema"])


def ensure_plan(spec, store) -> dict:
    """The stored plan when it belongs to this spec, else a new one (stored); SpecError on a clash."""
    existing = store.read_json(PLAN)
    if existing is not None:
        if existing.get("fingerprint") != spec.fingerprint():
            raise SpecError(
                f"output.uri: {spec.output.uri} already holds job {existing.get('job')!r} made from a different "
                "spec (input, prompt, sampling, model or output changed); use a new output.uri or delete it")
        return existing
    plan = make_plan(spec)
    if store.read_json(PLAN) is None:  # another worker may have just written the same plan
        store.write_json(PLAN, plan)
    return plan


def worker_shards(plan, workers: int, index: int) -> list:
    return [s for s in plan["shards"] if s["index"] % workers == index]


def format_table(plan, workers: int) -> str:
    """The `batchllm plan` table: one line per shard and a total."""
    head = ("shard", "worker", "files", "rows", "est. prompt tok", "max gen tok")
    lines = []
    shards = plan["shards"]
    shown = shards if len(shards) <= 60 else shards[:50] + [None] + shards[-5:]
    for s in shown:
        if s is None:
            lines.append(("...",) * len(head))
            continue
        files = len({p["uri"] for p in s["pieces"]})
        lines.append((str(s["index"]), str(s["index"] % workers), str(files), f"{s['rows']:,}",
                       f"{s['est_prompt_tokens']:,}", f"{s['max_generation_tokens']:,}"))
    total = ("total", str(min(workers, len(shards))), str(plan["files"]), f"{plan['total_rows']:,}",
             f"{sum(s['est_prompt_tokens'] for s in shards):,}",
             f"{sum(s['max_generation_tokens'] for s in shards):,}")
    widths = [max(len(r[i]) for r in [head, total] + lines) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule] + [fmt(r) for r in lines] + [rule, fmt(total)])
