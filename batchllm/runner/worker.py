"""The worker: runs this worker's shards of a job through the engine and commits results in parts.

Run it as `batchllm worker job.yaml --index I` (the container entrypoint); the index may also come from
JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, CLOUD_RUN_TASK_INDEX or SLURM_ARRAY_TASK_ID. Worker I
runs shards I, I+W, I+2W, ... (W = compute.workers), resuming each after its committed rows.

Per shard: rows stream from the input, become requests (or error records), and feed `LLM.stream`, which
pulls them lazily; finished rows are buffered and committed as parts (writer.py), then recorded in the
shard checkpoint (checkpoint.py). On SIGTERM/SIGINT the worker admits no more rows, lets the engine
finish what it holds until the grace period nearly ends, commits, pushes metrics and exits 75.
Exit codes: 0 shards complete, 1 failed (or error ratio over max_error_ratio), 2 spec error, 75 retry.
"""
import contextlib
import logging
import os
import signal
import threading
import time

from batchllm.models.sources import FetchError, ModelError
from batchllm.runner import dataset
from batchllm.runner.checkpoint import ShardCheckpoint
from batchllm.runner.manifest import finalize, start_manifest
from batchllm.runner.metrics import ShardMetrics
from batchllm.runner.openai_batch import error_line, parse_request, result_line
from batchllm.runner.plan import ensure_plan, key_schema, worker_shards
from batchllm.runner.prompts import PromptBuilder, RowError, sampling_params
from batchllm.runner.spec import SpecError
from batchllm.runner.storage import Store
from batchllm.runner.writer import PartWriter

log = logging.getLogger("batchllm.runner")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRY = 0, 1, 2, 75
INDEX_VARS = ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX", "SLURM_ARRAY_TASK_ID")


class GraceExpired(Exception):
    """Raised in the worker's thread when the SIGTERM grace period runs out."""


class Stopper:
    """SIGTERM/SIGINT: stop admitting rows; at the soft deadline, abandon unfinished rows.

    The soft deadline leaves a margin of the grace period for the last commit and metrics push. The
    alarm never interrupts a commit or a half-added row: it waits until that is done.
    """

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.margin = min(5.0, 0.25 * grace_s)
        self.requested = False
        self.deadline = None
        self._in_commit = 0
        self._deferred = False
        self._disarmed = False
        self._saved = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                             (signal.SIGALRM, self._on_alarm)):
            self._saved[sig] = signal.signal(sig, handler)
        return self

    def restore(self):
        if self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _on_stop(self, signum, frame):
        if self.requested:  # a second signal: give up on unfinished rows now
            self._on_alarm(signum, frame)
            return
        self.requested = True
        self.deadline = time.monotonic() + self.grace_s
        log.warning("%s: admitting no more rows; committing finished ones (grace %.0fs)",
                    signal.Signals(signum).name, self.grace_s)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.grace_s - self.margin))

    def disarm(self):
        """No more GraceExpired: called once the engine loop is left and only the last commit remains."""
        if self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self._disarmed = True
        self._deferred = False

    def _on_alarm(self, signum, frame):
        if self._disarmed:
            return
        if self._in_commit:
            self._deferred = True
            return
        raise GraceExpired()

    @contextlib.contextmanager
    def critical(self):
        self._in_commit += 1
        try:
            yield
        finally:
            self._in_commit -= 1
            if not self._in_commit and self._deferred:
                self._deferred = False
                raise GraceExpired()


def resolve_index(index, workers: int) -> int:
    """--index, else the platform's array-index variable, else 0 for a one-worker job."""
    source = "--index"
    if index is None:
        for var in INDEX_VARS:
            if os.environ.get(var, "").strip():
                source, raw = var, os.environ[var].strip()
                try:
                    index = int(raw)
                except ValueError:
                    raise SpecError(f"{var}: expected a worker index (an integer), got {raw!r}") from None
                break
    if index is None:
        if workers == 1:
            return 0
        raise SpecError(f"worker: no index; pass --index 0..{workers - 1} or set one of {', '.join(INDEX_VARS)}")
    if not 0 <= index < workers:
        raise SpecError(f"{source}: {index} is out of range; compute.workers is {workers}, so use 0..{workers - 1}")
    return index


def make_engine(spec):
    import batchllm

    e = spec.engine
    return batchllm.LLM(
        spec.model.source, device=e.device, dtype=e.dtype, block_size=e.block_size, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, enable_prefix_caching=e.enable_prefix_caching,
        max_model_len=spec.model.max_model_len, num_kv_blocks=e.num_kv_blocks,
        gpu_memory_utilization=e.gpu_memory_utilization, enforce_eager=e.enforce_eager,
        piecewise_graphs=e.piecewise_graphs, kv_cache_dtype=e.kv_cache_dtype,
        quantization=None if spec.model.quantization == "none" else spec.model.quantization,
    )


class _ShardRun:
    """One shard from its checkpoint to complete (or to a stop)."""

    def __init__(self, spec, store, plan, shard, llm, stopper, progress, started):
        self.spec, self.store, self.plan, self.shard, self.llm = spec, store, plan, shard, llm
        self.stopper, self.progress = stopper, progress
        self.openai = plan["format"] == "openai-batch"
        self.ck = ShardCheckpoint.load(store, shard["index"], plan["fingerprint"], shard["rows"])
        self.writer = PartWriter(store, shard["index"], "openai" if self.openai else "table",
                                 plan["output_format"], key_schema(plan), convert=plan["convert_columns"])
        self.writer.started = started
        self.seq = self.ck.next_seq()
        self.last_commit = time.monotonic()
        self.pending = {}
        self.exhausted = False
        self.builder = None if self.openai else PromptBuilder(spec.prompt)
        self.base_sampling = spec.sampling.model_dump()
        self.columns = None
        if not self.openai:
            cols = self.builder.columns + list(spec.output.columns)
            self.columns = list(dict.fromkeys(cols + ([spec.input.id_column] if spec.input.id_column else [])))

    # ---- commits ----

    def commit(self, final=False):
        with self.stopper.critical():
            if self.writer.num_pending:
                part = self.writer.commit(self.seq)
                self.seq += 1
                self.ck.add_part(part, complete=final)
                log.debug("shard %d: committed part %d (%d rows)", self.shard["index"], part["seq"],
                          part["num_ok"] + part["num_error"])
            elif final and not self.ck.complete:
                self.ck.mark_complete()
            self.last_commit = time.monotonic()

    def maybe_commit(self):
        n = self.writer.num_pending
        if n >= self.spec.output.rows_per_part or (
                n and time.monotonic() - self.last_commit >= self.spec.output.commit_interval_s):
            self.commit()

    # ---- rows ----

    def _error(self, ordinal, position, row_id, custom_id, error_type, message, report=True):
        if self.openai:
            rec = error_line(self.spec.name, custom_id, error_type, message)
        else:
            rec = {"id": row_id, "row": position, "error_type": error_type, "message": message}
        with self.stopper.critical():  # buffer + ordinal together, or neither
            self.writer.add_error(ordinal, rec)
            self.metrics.row_done(False)
        if report and self.progress:
            self.progress(1)

    def requests(self):
        """(request_id, prompt, SamplingParams) for each uncommitted row; bad rows go to errors."""
        spec = self.spec
        rows = dataset.iter_rows(self.fs, self.shard["pieces"], self.plan["format"], self.columns,
                                 skip=self.ck.committed)
        for ordinal, position, row, err in rows:
            if self.stopper.requested:
                return
            row_id = position if spec.input.id_column is None else None
            custom_id = url = None
            try:
                if err is not None:
                    raise RowError(*err)
                if self.openai:
                    custom_id = row.get("custom_id") if isinstance(row.get("custom_id"), str) else None
                    custom_id, prompt, url, overrides = parse_request(row)
                    sp = sampling_params(self.base_sampling, overrides)
                    ctx = (ordinal, position, custom_id, url)
                else:
                    if spec.input.id_column is not None:
                        if row.get(spec.input.id_column) is None:
                            raise RowError("missing_column", f"id column {spec.input.id_column!r} is missing or null")
                        row_id = row[spec.input.id_column]
                    prompt = self.builder.build(row)
                    sp = sampling_params(self.base_sampling)
                    ctx = (ordinal, position, row_id, {c: row.get(c) for c in spec.output.columns})
            except RowError as e:
                self._error(ordinal, position, row_id, custom_id, e.error_type, e.message)
                self.maybe_commit()
                continue
            rid = str(ordinal)
            self.pending[rid] = ctx
            yield rid, prompt, sp
        self.exhausted = True

    def finished(self, out):
        with self.stopper.critical():  # popped from pending and buffered together, or neither
            self._finished(out)
        if self.progress:
            self.progress(1)

    def _finished(self, out):
        ctx = self.pending.pop(out.request_id)
        ordinal, position = ctx[0], ctx[1]
        if out.finish_reason == "error":
            msg = out.error or "the engine could not run this row"
            ident = ctx[2]
            self._error(ordinal, position, None if self.openai else ident, ident if self.openai else None,
                        out.error_type or "engine_error", msg, report=False)
            return
        p, c = len(out.prompt_token_ids), len(out.token_ids)
        if self.openai:
            rec = result_line(self.spec.name, self.spec.model.source, ctx[2], ctx[3], out)
        else:
            rec = {"id": ctx[2], **ctx[3], "output": out.text, "finish_reason": out.finish_reason,
                   "prompt_tokens": p, "completion_tokens": c}
        self.writer.add_result(ordinal, rec, p, c)
        self.metrics.row_done(True, p, c)

    # ---- the run ----

    def run(self) -> str:
        """'complete' or 'stopped'; exceptions other than GraceExpired propagate after a commit."""
        idx = self.shard["index"]
        removed = self.ck.remove_orphans()
        if removed:
            log.info("shard %d: removed %d uncommitted part file(s) of an earlier run", idx, len(removed))
        self.metrics = ShardMetrics(self.spec.metrics, self.spec.name, idx, self.shard["rows"],
                                    self.spec.cost.gpu_hour_usd, self.ck.totals()).start()
        self.fs = dataset.open_input(self.shard["pieces"][0]["uri"], self.spec.storage)
        status, exit_code, interrupted = "stopped", EXIT_RETRY, False
        try:
            last_stats = 0.0
            for out in self.llm.stream(self.requests()):
                self.finished(out)
                self.maybe_commit()
                now = time.monotonic()
                if now - last_stats >= 1.0:
                    last_stats = now
                    self.metrics.engine_stats(self.llm.stats())
        except GraceExpired:
            interrupted = True
            log.warning("shard %d: grace period over; %d unfinished row(s) left for the next run",
                        idx, len(self.pending))
        except BaseException:
            exit_code = EXIT_FAILED
            with contextlib.suppress(Exception):
                self.commit()
            self.metrics.close(exit_code=EXIT_FAILED)
            raise
        if self.stopper.requested:
            self.stopper.disarm()  # the engine loop is over: what is left is the last commit and push
        done = self.exhausted and not self.pending and not interrupted
        self.commit(final=done)
        if done:
            status, exit_code = "complete", EXIT_OK
            if len(self.ck.committed) != self.shard["rows"]:
                log.warning("shard %d: %d rows committed but the plan counted %d; did the input change?",
                            idx, len(self.ck.committed), self.shard["rows"])
        with contextlib.suppress(Exception):
            self.metrics.engine_stats(self.llm.stats())
        self.metrics.close(exit_code=exit_code, complete=done)
        return status


def run_worker(spec, index=None, progress=None) -> int:
    """Run worker `index` of the job to completion (or to a stop); returns the exit code."""
    workers = spec.compute.workers
    index = resolve_index(index, workers)
    stopper = Stopper(spec.compute.grace_period_s).install()
    started = time.monotonic()
    try:
        store = Store(spec.output.uri, spec.storage)
        plan = ensure_plan(spec, store)
        start_manifest(store, spec, plan)
        mine = worker_shards(plan, workers, index)
        todo = [s for s in mine
                if not ShardCheckpoint.load(store, s["index"], plan["fingerprint"], s["rows"]).complete]
        log.info("worker %d/%d: %d shard(s), %d to run", index, workers, len(mine), len(todo))
        stopped = stopper.requested
        if todo and not stopped:
            try:
                sampling_params(spec.sampling.model_dump())
            except RowError as e:
                raise SpecError(f"sampling: {e.message}") from None
            try:
                llm = make_engine(spec)
            except GraceExpired:
                return EXIT_RETRY
            except FetchError as e:  # the network or the storage, not the spec: a retry may fetch it
                log.error("model.source: %s; stopping with exit 75 so that the worker is tried again", e)
                return EXIT_RETRY
            except ValueError as e:  # the engine's and the model store's user errors (one line each)
                log.debug("engine construction failed", exc_info=True)
                field = "model.source" if isinstance(e, ModelError) else "engine"
                raise SpecError(f"{field}: {e}") from None
            for shard in todo:
                if stopper.requested:
                    stopped = True
                    break
                if _ShardRun(spec, store, plan, shard, llm, stopper, progress, started).run() != "complete":
                    stopped = True
                    break
                started = time.monotonic()
        if stopped:
            return EXIT_RETRY
    except GraceExpired:
        return EXIT_RETRY
    finally:
        stopper.restore()
    manifest = finalize(store, spec, plan)
    totals = _totals(store, plan, mine)
    done = totals["num_ok"] + totals["num_error"]
    ratio = totals["num_error"] / done if done else 0.0
    log.info("worker %d: %d ok, %d errors%s", index, totals["num_ok"], totals["num_error"],
             f"; job {manifest['status']}" if manifest else "")
    return EXIT_FAILED if ratio > spec.max_error_ratio else EXIT_OK


def _totals(store, plan, shards) -> dict:
    out = {"num_ok": 0, "num_error": 0}
    for s in shards:
        t = ShardCheckpoint.load(store, s["index"], plan["fingerprint"], s["rows"]).totals()
        out["num_ok"] += t["num_ok"]
        out["num_error"] += t["num_error"]
    return out
