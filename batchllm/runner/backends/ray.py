"""The `ray` backend: each worker is a Ray task on a cluster, retried by Ray when it stops early or its node dies.

    compute: {backend: ray, workers: 8, ray: {address: "ray-head:6379"}}   # or RAY_ADDRESS; none: a local Ray

`batchllm submit` is the driver: it connects, checks that the cluster has the GPUs a worker asks for
(`gpus_per_worker`), and starts one task per worker index. A task writes the resolved job file on its node and
runs `batchllm worker FILE --index I` as a child process there (Ray gives it its GPUs through
CUDA_VISIBLE_DEVICES, and its CPUs through OMP_NUM_THREADS). The child's progress lines go to a small actor the
driver reads for the bar. A child that does not finish (exit 75: preempted, SIGTERM; exit 1: a crash; killed:
OOM, a lost node) fails its task, and Ray runs it again up to `max_retries` times; the new child resumes from the
shard checkpoints. Exit 0 and 2 (a spec error) are final.

The driver must stay up while the tasks run: run it on the cluster with `ray job submit -- batchllm submit JOB`
for fire-and-forget. Ctrl-C / SIGTERM on the driver cancels the tasks; each passes SIGTERM to its worker, which
commits what it finished and exits 75, so the next submit resumes.
"""
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from batchllm.runner.backends.local import PROGRESS_ENV, Bar, on_stop, progress_rows
from batchllm.runner.spec import SpecError
from batchllm.runner.worker import EXIT_FAILED, EXIT_OK, EXIT_RETRY, EXIT_USAGE, INDEX_VARS

log = logging.getLogger("batchllm.runner")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerStopped(Exception):
    """A worker child ended without finishing (exit 1 or 75, a signal); Ray retries the task on it."""

    def __init__(self, index: int, code: int):
        super().__init__(index, code)  # the args Ray's pickling rebuilds the exception from
        self.index, self.code = index, code

    def __str__(self):
        return f"worker {self.index} exited with {self.code}"


def describe(spec, job_path: str, overrides=()) -> str:
    c = spec.compute
    where = c.ray.address or os.environ.get("RAY_ADDRESS") or "a local Ray (a running one, else a new one)"
    return (f"ray: {c.workers} task(s) `batchllm worker <resolved job file> --index I` (I = 0..{c.workers - 1}), "
            f"{spec.gpus_per_worker()} GPU(s) each, on {where}; each retried up to {c.max_retries} times")


def check(spec, wait: bool):
    """Refusals due before the plan is stored: --no-wait, an unreachable cluster, one without the GPUs asked for."""
    if not wait:
        raise SpecError("--no-wait: the ray backend's driver must stay up while workers run; for fire-and-forget "
                        "run the driver on the cluster: ray job submit -- batchllm submit JOB")
    _check_cluster(_connect(spec), spec, spec.gpus_per_worker())


def _connect(spec):
    import ray

    if ray.is_initialized():
        return ray
    address = spec.compute.ray.address
    if address and ":" in address and not address.startswith("ray://"):  # fail fast where Ray would retry for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise SpecError(f"compute.ray.address: nothing answers at {address} (a Ray head's GCS port, "
                            f"e.g. head-host:6379)") from None
    try:
        ray.init(address=address, runtime_env=spec.compute.ray.runtime_env or None, log_to_driver=True,
                 configure_logging=False)
    except (ConnectionError, ValueError, ImportError, RuntimeError) as e:  # e.g. ray:// without ray[client]
        raise SpecError(f"compute.ray.address: {str(e).strip().splitlines()[0]}") from None
    return ray


def _check_cluster(ray, spec, gpus: int):
    """One-line errors for what would otherwise leave tasks pending forever or write results nobody sees."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most = max((n.get("Resources", {}).get("GPU", 0) for n in nodes), default=0)
    if gpus > most and not spec.compute.ray.autoscaling:
        have = f"its nodes have at most {most:g}" if most else "it has none"
        raise SpecError(f"compute.gpus_per_worker: a worker asks for {gpus} GPU(s) but {have}; set "
                        f"compute.gpus_per_worker (0 runs on the CPU with engine.device: cpu), or "
                        f"compute.ray.autoscaling: true where GPU nodes start on demand")
    if len(nodes) > 1:
        for field in ("input", "output"):
            if "://" not in getattr(spec, field).uri:
                raise SpecError(f"{field}.uri: a local path, but the Ray cluster has {len(nodes)} nodes; use "
                                f"object storage (s3://, gs://, ...) or a path every node mounts as a URI (file://)")


def _cpus(ray, spec, gpus: int) -> float:
    """CPUs a task asks for: compute.ray.cpus_per_worker, else 1 beside GPUs; a CPU worker gets its share of the
    cluster (at most one node's)."""
    if spec.compute.ray.cpus_per_worker is not None:
        return spec.compute.ray.cpus_per_worker
    if gpus:
        return 1
    nodes = [n.get("Resources", {}).get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1]
    return max(1, min(max(nodes), sum(nodes) // spec.compute.workers))


def run(spec, job_path: str, overrides=(), wait=True, initial=0, total=0, show_progress=True) -> int:
    """Run every worker as a Ray task and wait; the job's exit code (0, 1 or 75). `check` ran before."""
    ray = _connect(spec)
    gpus, workers, grace = spec.gpus_per_worker(), spec.compute.workers, spec.compute.grace_period_s
    cpus = _cpus(ray, spec, gpus)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    task = ray.remote(_worker_task)
    options = dict(num_gpus=gpus, num_cpus=cpus, max_retries=spec.compute.max_retries, retry_exceptions=[WorkerStopped])
    job_yaml, cwd = spec.resolved_yaml(), os.getcwd()
    futures = {task.options(name=f"batchllm-worker-{i}", **options).remote(job_yaml, i, cwd, grace, progress): i
               for i in range(workers)}
    log.info("%s: %d Ray task(s) started, %d GPU(s) and %g CPU(s) each", spec.name, workers, gpus, cpus)

    bar = Bar(total, initial, spec.name, show_progress)
    codes: dict[int, int] = {}
    stopping = threading.Event()
    try:
        with on_stop(lambda signum: stopping.set()):
            pending = list(futures)
            while pending:
                if stopping.is_set():
                    _cancel(ray, pending, progress, grace)
                    break
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                bar.update(ray.get(progress.take.remote()))
                for f in done:
                    codes[futures[f]] = _outcome(ray, f, futures[f])
            bar.update(ray.get(progress.take.remote()))
    finally:
        bar.close()
    codes = [codes.get(i, EXIT_RETRY) for i in range(workers)]
    if stopping.is_set() or EXIT_RETRY in codes:
        return EXIT_RETRY
    return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_FAILED


def _outcome(ray, future, index: int) -> int:
    try:
        return ray.get(future)
    except ray.exceptions.RayError as e:  # retries used up, or the task could not run at all
        cause = getattr(e, "cause", None) or e
        log.error("worker %d: %s; run `batchllm submit` again to resume", index, str(cause).splitlines()[0])
        return EXIT_FAILED if getattr(cause, "code", None) == EXIT_FAILED else EXIT_RETRY


def _cancel(ray, pending, progress, grace: float):
    """Cancel the running tasks (each passes SIGTERM to its worker) and give the workers time to commit."""
    log.info("stopping: %d worker(s) commit what they finished, then exit", len(pending))
    for f in pending:
        ray.cancel(f)
    deadline = time.monotonic() + grace + 15
    while time.monotonic() < deadline and ray.get(progress.running.remote()):
        time.sleep(0.5)
    for index, code in sorted(ray.get(progress.exit_codes.remote()).items()):
        log.info("worker %d: %s", index, f"exited with {code}" if code is not None else "did not stop in time")


class Progress:
    """A Ray actor: finished rows reported by the workers, taken by the driver; the workers running, and how the
    others ended."""

    def __init__(self):
        self.rows, self.children, self.codes = 0, set(), {}

    def add(self, n: int):
        self.rows += n

    def take(self) -> int:
        n, self.rows = self.rows, 0
        return n

    def started(self, index: int):
        self.children.add(index)

    def ended(self, index: int, code):
        self.children.discard(index)
        self.codes[index] = code

    def running(self) -> int:
        return len(self.children)

    def exit_codes(self) -> dict:
        return self.codes


def _die_with_parent():
    """A function for the child to run before exec: SIGTERM when the task's process dies (a crash, a kill), so a
    worker never outlives its task and overlaps the retry. Looked up here, in the parent: between fork and exec
    the child may only make the call (Linux; None elsewhere)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _relay(child, progress):
    """Progress lines to the actor, other lines to this task's stdout (Ray streams it to the driver)."""
    for line in child.stdout:
        rows = progress_rows(line)
        if rows is None:
            print(line, end="", flush=True)
        else:
            progress.add.remote(rows)


def _worker_task(job_yaml: str, index: int, cwd: str, grace: float, progress) -> int:
    """Ray task body: run worker `index` as a child process on this node; its exit code, or WorkerStopped."""
    env = {k: v for k, v in os.environ.items() if k not in INDEX_VARS}
    env[PROGRESS_ENV] = "1"
    with tempfile.TemporaryDirectory(prefix="batchllm-") as tmp:
        path = os.path.join(tmp, "job.yaml")
        with open(path, "w") as f:
            f.write(job_yaml)
        child = subprocess.Popen([sys.executable, "-m", "batchllm.cli", "worker", path, "--index", str(index)],
                                 env=env, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_die_with_parent(),
                                 cwd=cwd if os.path.isdir(cwd) else None)  # the driver's folder: relative model paths
        progress.started.remote(index)
        relay = threading.Thread(target=_relay, args=(child, progress), daemon=True)
        relay.start()
        code = None
        try:
            while code is None:  # short waits: ray.cancel's KeyboardInterrupt lands between them, even while the
                try:             # worker is silent (loading the model)
                    code = child.wait(0.5)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:  # ray.cancel: stop the worker the way a preemption does
            child.send_signal(signal.SIGTERM)
            try:
                code = child.wait(grace + 10)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
        finally:
            relay.join(5)
            progress.ended.remote(index, code)
    if code not in (EXIT_OK, EXIT_USAGE):
        raise WorkerStopped(index, code)
    return code
