"""Worker metrics: a prometheus-client registry per worker shard, pushed to a Pushgateway.

Grouping keys are job=<spec name> and shard=<index>: each shard's group holds that shard's totals, so
sum by (job) gives the job's. Counters start from the shard checkpoint's committed totals, so a
restarted worker keeps counting where its predecessor's committed work ended. Pushes happen every
metrics.interval_s from a background thread, when the shard ends, and on failure or SIGTERM. A failed
push is logged and never fails the job. Without a `metrics` section nothing is pushed.

  batchllm_rows_total{status="ok"|"error"}      rows finished (committed or about to be)
  batchllm_prompt_tokens_total                  prompt tokens of finished rows
  batchllm_generation_tokens_total              generated tokens of finished rows
  batchllm_generation_tokens_per_second         generated tokens/s of this worker run
  batchllm_kv_cache_usage_ratio                 engine KV-cache blocks in use (0..1)
  batchllm_prefix_cache_hit_ratio               prefix-cache hit tokens / queried tokens
  batchllm_preemptions_total                    engine preemptions in this worker run
  batchllm_shard_rows / batchllm_shard_rows_done / batchllm_shard_progress_ratio
  batchllm_shard_complete                       1 once every row of the shard is committed
  batchllm_gpu_hours / batchllm_estimated_cost_usd   worker time on the shard and its price
  batchllm_worker_exit_code                     set at exit (0, 1, 75); -1 while running
  batchllm_last_push_timestamp_seconds
"""
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

log = logging.getLogger("batchllm.runner")


class ShardMetrics:
    def __init__(self, metrics_spec, job: str, shard: int, rows: int, gpu_hour_usd: float, committed: dict):
        self.spec, self.job, self.shard, self.gpu_hour_usd = metrics_spec, job, shard, gpu_hour_usd
        r = self.registry = CollectorRegistry()
        self.rows = Counter("batchllm_rows", "Rows finished, by status", ["status"], registry=r)
        self.prompt_tokens = Counter("batchllm_prompt_tokens", "Prompt tokens of finished rows", registry=r)
        self.generation_tokens = Counter("batchllm_generation_tokens", "Generated tokens", registry=r)
        self.tokens_per_second = Gauge("batchllm_generation_tokens_per_second", "Generated tokens/s", registry=r)
        self.kv_cache_usage = Gauge("batchllm_kv_cache_usage_ratio", "KV-cache blocks in use (0..1)", registry=r)
        self.prefix_hit = Gauge("batchllm_prefix_cache_hit_ratio", "Prefix-cache hit ratio (tokens)", registry=r)
        self.preemptions = Counter("batchllm_preemptions", "Engine preemptions", registry=r)
        self.shard_rows = Gauge("batchllm_shard_rows", "Rows in the shard", registry=r)
        self.rows_done = Gauge("batchllm_shard_rows_done", "Rows of the shard finished", registry=r)
        self.progress = Gauge("batchllm_shard_progress_ratio", "Finished rows / shard rows", registry=r)
        self.complete = Gauge("batchllm_shard_complete", "1 once the shard is committed", registry=r)
        self.gpu_hours = Gauge("batchllm_gpu_hours", "Worker (GPU) hours spent on the shard", registry=r)
        self.cost = Gauge("batchllm_estimated_cost_usd", "gpu_hours * cost.gpu_hour_usd", registry=r)
        self.exit_code = Gauge("batchllm_worker_exit_code", "Worker exit code; -1 while running", registry=r)
        self.last_push = Gauge("batchllm_last_push_timestamp_seconds", "Time of this push", registry=r)
        self.rows.labels("ok").inc(committed.get("num_ok", 0))
        self.rows.labels("error").inc(committed.get("num_error", 0))
        self.prompt_tokens.inc(committed.get("prompt_tokens", 0))
        self.generation_tokens.inc(committed.get("completion_tokens", 0))
        self.shard_rows.set(rows)
        self.exit_code.set(-1)
        self._rows_total = rows
        self._done = committed.get("num_ok", 0) + committed.get("num_error", 0)
        self._seconds_before = committed.get("seconds", 0.0)
        self._start = time.monotonic()
        self._gen_this_run = 0
        self._preempt_seen = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()
        self._update_progress()

    def _update_progress(self):
        self.rows_done.set(self._done)
        self.progress.set(self._done / self._rows_total if self._rows_total else 1.0)
        hours = (self._seconds_before + time.monotonic() - self._start) / 3600.0
        self.gpu_hours.set(hours)
        self.cost.set(hours * self.gpu_hour_usd)

    def row_done(self, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0):
        self.rows.labels("ok" if ok else "error").inc()
        self._done += 1
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens)
            self._gen_this_run += completion_tokens

    def engine_stats(self, stats: dict):
        """Refresh the gauges from LLM.stats() (called from the worker's thread, which owns the engine)."""
        self.kv_cache_usage.set(float(stats.get("kv_cache_usage", 0.0)))
        queries = stats.get("prefix_cache_queries", 0)
        self.prefix_hit.set(stats.get("prefix_cache_hits", 0) / queries if queries else 0.0)
        pre = int(stats.get("num_preemptions", 0))
        if self._preempt_seen is not None and pre > self._preempt_seen:
            self.preemptions.inc(pre - self._preempt_seen)
        self._preempt_seen = pre
        elapsed = time.monotonic() - self._start
        self.tokens_per_second.set(self._gen_this_run / elapsed if elapsed > 0 else 0.0)
        self._update_progress()

    # ---- pushing ----

    def push(self):
        if self.spec is None:
            return
        with self._lock:
            self._update_progress()
            self.last_push.set(time.time())
            try:
                push_to_gateway(self.spec.pushgateway, job=self.job, registry=self.registry,
                                grouping_key={"shard": str(self.shard)}, timeout=3)
            except Exception as e:  # noqa: BLE001 (metrics never fail the job)
                log.warning("metrics push to %s failed: %s", self.spec.pushgateway, e)

    def start(self):
        if self.spec is None:
            return self
        self.push()
        self._thread = threading.Thread(target=self._loop, name=f"metrics-shard-{self.shard}", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.spec.interval_s):
            self.push()

    def close(self, exit_code=None, complete=False):
        """Stop the push thread and push the final values."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if complete:
            self.complete.set(1)
        if exit_code is not None:
            self.exit_code.set(exit_code)
        self.push()
