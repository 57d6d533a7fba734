"""The job manifest (OUTPUT/_batchllm/manifest.json) and the job summary `batchllm status` prints.

The manifest says what the job is (name, model, rows, shards, price per GPU-hour) and, once every shard
is complete, how it ended: complete, or failed when the error ratio is over max_error_ratio. The worker
that completes the last shard writes the final state, so it holds with or without `submit` waiting.
"""
import time

from batchllm.runner.checkpoint import load_all

MANIFEST = "_batchllm/manifest.json"


def start_manifest(store, spec, plan) -> dict:
    m = store.read_json(MANIFEST)
    if m is None or m.get("fingerprint") != plan["fingerprint"]:
        m = {"job": spec.name, "fingerprint": plan["fingerprint"], "status": "running", "created": time.time(),
             "model": spec.model.source, "input_uri": spec.input.uri, "output_uri": spec.output.uri,
             "format": plan["format"], "output_format": plan["output_format"], "total_rows": plan["total_rows"],
             "shards": len(plan["shards"]), "workers": spec.compute.workers,
             "gpu_hour_usd": spec.cost.gpu_hour_usd, "max_error_ratio": spec.max_error_ratio}
        store.write_json(MANIFEST, m)
    return m


def summarize(plan, checkpoints, manifest=None) -> dict:
    """Progress, tokens, time and cost from the plan and the shard checkpoints."""
    manifest = manifest or {}
    keys = ("num_ok", "num_error", "prompt_tokens", "completion_tokens", "seconds")
    totals = {k: 0 for k in keys}
    for ck in checkpoints:
        for k, v in ck.totals().items():
            totals[k] += v
    done = totals["num_ok"] + totals["num_error"]
    rows = plan["total_rows"]
    complete = sum(1 for ck in checkpoints if ck.complete)
    ratio = totals["num_error"] / done if done else 0.0
    max_ratio = manifest.get("max_error_ratio", 0.1)
    if complete == len(checkpoints):
        state = "failed" if ratio > max_ratio else "complete"
    else:
        state = "running" if done else "pending"
    hours = totals["seconds"] / 3600.0
    return dict(totals, job=plan["job"], state=state, total_rows=rows, rows_done=done,
                shards=len(checkpoints), shards_complete=complete, error_ratio=ratio, max_error_ratio=max_ratio,
                gpu_hours=hours, est_cost_usd=hours * manifest.get("gpu_hour_usd", 0.0),
                tokens_per_s=totals["completion_tokens"] / totals["seconds"] if totals["seconds"] else 0.0)


def finalize(store, spec, plan):
    """Write the final manifest when every shard is complete; returns it, or None while shards remain."""
    checkpoints = load_all(store, plan)
    if not all(ck.complete for ck in checkpoints):
        return None
    m = store.read_json(MANIFEST) or start_manifest(store, spec, plan)
    policy = {"max_error_ratio": spec.max_error_ratio, "gpu_hour_usd": spec.cost.gpu_hour_usd}
    s = summarize(plan, checkpoints, dict(m, **policy))
    final = {**policy, "status": s["state"], "num_ok": s["num_ok"], "num_error": s["num_error"],
             "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
             "gpu_hours": round(s["gpu_hours"], 6), "est_cost_usd": round(s["est_cost_usd"], 6)}
    if any(m.get(k) != v for k, v in final.items()):
        m.update(final, finished=time.time())
        store.write_json(MANIFEST, m)
    return m


def format_summary(s: dict, uri: str) -> str:
    pct = 100.0 * s["rows_done"] / s["total_rows"] if s["total_rows"] else 100.0
    lines = [
        f"job        {s['job']}  ({uri})",
        f"state      {s['state']}",
        f"progress   {s['rows_done']:,}/{s['total_rows']:,} rows ({pct:.1f}%), "
        f"shards {s['shards_complete']}/{s['shards']} complete",
        f"rows       {s['num_ok']:,} ok, {s['num_error']:,} errors "
        f"(error ratio {s['error_ratio']:.3f}, max {s['max_error_ratio']})",
        f"tokens     {s['prompt_tokens']:,} prompt, {s['completion_tokens']:,} generated",
        f"throughput {s['tokens_per_s']:,.1f} generated tok/s per worker",
        f"GPU-hours  {s['gpu_hours']:.4f}",
        f"est. cost  ${s['est_cost_usd']:.4f}",
    ]
    return "\n".join(lines)
