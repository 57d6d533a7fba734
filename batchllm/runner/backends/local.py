"""The `local` backend: runs compute.workers workers on this machine and shows a live progress bar.

One worker runs in this process. Several run as `batchllm worker JOB --index I` child processes, one GPU
each through CUDA_VISIBLE_DEVICES (or CPU threads split between them); with more workers than GPUs, each
GPU runs its share one after another (`lanes`). They report finished rows on stdout lines the bar reads.
SIGTERM/SIGINT is passed on to the running workers, which commit and exit 75; workers not yet started
are left for the next submit.
"""
import contextlib
import logging
import os
import shlex
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


def progress_rows(line: str):
    """The rows a worker's progress line reports (0 if garbled), or None for any other line."""
    if not line.startswith(PROGRESS_TAG):
        return None
    try:
        return int(line[len(PROGRESS_TAG):])
    except ValueError:
        return 0


@contextlib.contextmanager
def on_stop(handler):
    """SIGTERM and SIGINT call handler(signum) while the block runs (only the main thread may take signals)."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


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
        rows = progress_rows(line)
        if rows is None:
            out.write(line)
            out.flush()
        else:
            bar.update(rows)


def worker_command(job_path: str, overrides, index: int) -> list[str]:
    return ([sys.executable, "-m", "batchllm.cli", "worker", job_path] + [a for o in overrides for a in ("--set", o)]
            + ["--index", str(index)])


def describe(spec, job_path: str, overrides=()) -> str:
    """The worker processes `run` would start: a line a GPU (or a worker), the commands of one line in turn."""
    workers, gpus = spec.compute.workers, _gpu_ids(spec)
    if workers == 1:
        return f"local: 1 worker in this process: {shlex.join(worker_command(job_path, overrides, 0))}"
    lines = [f"local: {workers} worker processes on {len(gpus)} GPU(s)" if gpus else
             f"local: {workers} worker processes on the CPU"]
    for group in lanes(workers, gpus):
        env = f"CUDA_VISIBLE_DEVICES={gpus[group[0] % len(gpus)]} " if gpus else ""
        lines.append(env + " ; ".join(shlex.join(worker_command(job_path, overrides, i)) for i in group))
    return "\n".join(lines)


def lanes(workers: int, gpus: list[str]) -> list[list[int]]:
    """Worker indices grouped by what runs them: with fewer GPUs than workers, GPU g runs workers g, g + len(gpus),
    ... one after another (each gets the whole card's memory, where two at once would split its KV pool); else
    every worker runs at once (one GPU each, or CPU threads)."""
    if gpus and workers > len(gpus):
        return [list(range(g, workers, len(gpus))) for g in range(len(gpus))]
    return [[i] for i in range(workers)]


def check(spec, wait: bool):
    """Refusals due before anything is written."""
    if spec.compute.workers > 1 and (spec.input.uri.startswith("memory:") or spec.output.uri.startswith("memory:")):
        raise SpecError("compute.workers: memory:// lives in one process; use workers: 1 or real storage")


def run(spec, job_path: str, overrides=(), wait=True, initial=0, total=0, show_progress=True) -> int:
    """Run the job's workers; with wait, return the job's exit code (0, 1 or 75)."""
    workers = spec.compute.workers
    if workers == 1 and wait:
        bar = Bar(total, initial, spec.name, show_progress)
        try:
            return run_worker(spec, 0, progress=bar.update)
        finally:
            bar.close()

    gpus = _gpu_ids(spec)
    groups = lanes(workers, gpus)
    if len(groups) < workers:
        log.info("%d workers on %d GPU(s): each GPU runs its workers one after another", workers, len(gpus))
    command = lambda i: worker_command(job_path, overrides, i)  # noqa: E731
    if not wait:
        return _detach(spec, groups, gpus, command)

    bar = Bar(total, initial, spec.name, show_progress)
    codes: dict[int, int] = {}
    running: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()
    stopping = {"sig": None}

    def lane(indices):
        for i in indices:
            with lock:
                if stopping["sig"] is not None:  # stopped before this one started: it resumes on the next submit
                    codes[i] = EXIT_RETRY
                    continue
                p = subprocess.Popen(command(i), env=_child_env(spec, i, gpus), stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
                running[i] = p
            _pump(p, bar, sys.stdout)
            codes[i] = p.wait()
            with lock:
                del running[i]

    def forward(signum):
        with lock:
            stopping["sig"] = signum
            for p in running.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)

    threads = [threading.Thread(target=lane, args=(g,), daemon=True) for g in groups]
    try:
        with on_stop(forward):
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # short waits: signals reach the handler between them
    finally:
        bar.close()
    codes = [codes.get(i, EXIT_FAILED) for i in range(workers)]
    for i, c in enumerate(codes):
        if c not in (EXIT_OK, EXIT_FAILED, EXIT_RETRY):
            log.error("worker %d exited with %s; run `batchllm submit` again to resume", i, c)
    if any(c == EXIT_RETRY for c in codes) or stopping["sig"] is not None:
        return EXIT_RETRY
    if all(c in (EXIT_OK, EXIT_FAILED) for c in codes):
        return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_FAILED
    return EXIT_FAILED


def _detach(spec, groups, gpus, command) -> int:
    """Start every lane in the background (its workers chained by a shell where a GPU runs several), each worker
    logging to a file of its own; return at once."""
    logs = tempfile.mkdtemp(prefix=f"batchllm-{spec.name}-")
    for group in groups:
        steps = [f"{shlex.join(command(i))} > {shlex.quote(os.path.join(logs, f'worker-{i}.log'))} 2>&1"
                 for i in group]
        p = subprocess.Popen(["/bin/sh", "-c", "; ".join(steps)], env=_child_env(spec, group[0], gpus),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        log.info("worker(s) %s: pid %d, logs %s/worker-N.log", ", ".join(map(str, group)), p.pid, logs)
    return EXIT_OK
