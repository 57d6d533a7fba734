"""The `local` backend: runs compute.workers workers on this machine and shows a live progress bar.

One worker runs in this process. Several run as `batchllm worker JOB --index I` child processes, one GPU
each through CUDA_VISIBLE_DEVICES (or CPU threads split between them); they report finished rows on
stdout lines the bar reads. SIGTERM/SIGINT is passed on to the workers, which commit and exit 75.
"""
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from batchllm.runner.spec import SpecError
from batchllm.runner.worker import EXIT_FAILED, EXIT_OK, EXIT_RETRY, run_worker

log = logging.getLogger("batchllm.runner")
PROGRESS_ENV = "BATCHLLM_PROGRESS"
PROGRESS_TAG = "@@batchllm-progress "


class Bar:
    """tqdm on a terminal; a log line every 15 s otherwise."""

    def __init__(self, total: int, initial: int, job: str, show: bool):
        self.total, self.n, self.job = total, initial, job
        self._lock = threading.Lock()
        self._last_line = time.monotonic()
        self.tqdm = None
        self._redirect = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.tqdm = tqdm(total=total, initial=initial, desc=job, unit="row", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("batchllm")])
            self._redirect.__enter__()  # log lines print above the bar, not through it
        self.show = show

    def update(self, n: int):
        with self._lock:
            self.n += n
            if self.tqdm is not None:
                self.tqdm.update(n)
            elif self.show and time.monotonic() - self._last_line >= 15:
                self._last_line = time.monotonic()
                log.info("%s: %d/%d rows", self.job, self.n, self.total)

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
            self._redirect.__exit__(None, None, None)


def progress_printer():
    """The callback a child worker uses to report finished rows to the parent (throttled)."""
    state = {"n": 0, "t": 0.0}
    lock = threading.Lock()

    def report(n: int):
        with lock:
            state["n"] += n
            now = time.monotonic()
            if now - state["t"] >= 0.5:
                sys.stdout.write(f"{PROGRESS_TAG}{state['n']}\n")
                sys.stdout.flush()
                state["n"], state["t"] = 0, now
    return report


def _gpu_ids(spec):
    if spec.engine.device == "cpu":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v for v in visible.split(",") if v.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 (no torch CUDA: CPU workers)
        return []


def _child_env(spec, index, gpus):
    env = dict(os.environ)
    env[PROGRESS_ENV] = "1"
    for var in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        threads = max(1, (os.cpu_count() or 1) // spec.compute.workers)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _pump(proc, bar, out):
    for line in proc.stdout:
        if line.startswith(PROGRESS_TAG):
            try:
                bar.update(int(line[len(PROGRESS_TAG):]))
            except ValueError:
                pass
        else:
            out.write(line)
            out.flush()


def run(spec, job_path: str, overrides=(), wait=True, initial=0, total=0, show_progress=True) -> int:
    """Run the job's workers; with wait, return the job's exit code (0, 1 or 75)."""
    workers = spec.compute.workers
    if workers > 1 and (spec.input.uri.startswith("memory:") or spec.output.uri.startswith("memory:")):
        raise SpecError("compute.workers: memory:// lives in one process; use workers: 1 or real storage")
    if workers == 1 and wait:
        bar = Bar(total, initial, spec.name, show_progress)
        try:
            return run_worker(spec, 0, progress=bar.update)
        finally:
            bar.close()

    gpus = _gpu_ids(spec)
    if gpus and len(gpus) < workers:
        log.warning("%d workers share %d GPU(s)", workers, len(gpus))
    base = [sys.executable, "-m", "batchllm.cli", "worker", job_path] + [a for o in overrides for a in ("--set", o)]
    if not wait:
        logs = tempfile.mkdtemp(prefix=f"batchllm-{spec.name}-")
        for i in range(workers):
            with open(os.path.join(logs, f"worker-{i}.log"), "w") as f:
                p = subprocess.Popen(base + ["--index", str(i)], env=_child_env(spec, i, gpus), stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            log.info("worker %d: pid %d, log %s/worker-%d.log", i, p.pid, logs, i)
        return EXIT_OK

    bar = Bar(total, initial, spec.name, show_progress)
    procs = [subprocess.Popen(base + ["--index", str(i)], env=_child_env(spec, i, gpus), stdout=subprocess.PIPE,
                              text=True, bufsize=1) for i in range(workers)]
    pumps = [threading.Thread(target=_pump, args=(p, bar, sys.stdout), daemon=True) for p in procs]
    for t in pumps:
        t.start()
    stopping = {"sig": None}

    def forward(signum, frame):
        stopping["sig"] = signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
        for t in pumps:
            t.join(timeout=5)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        bar.close()
    for i, c in enumerate(codes):
        if c not in (EXIT_OK, EXIT_FAILED, EXIT_RETRY):
            log.error("worker %d exited with %s; run `batchllm submit` again to resume", i, c)
    if any(c == EXIT_RETRY for c in codes) or stopping["sig"] is not None:
        return EXIT_RETRY
    if all(c in (EXIT_OK, EXIT_FAILED) for c in codes):
        return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_FAILED
    return EXIT_FAILED
