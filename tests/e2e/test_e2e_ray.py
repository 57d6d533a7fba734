"""The ray backend on a real one-node Ray cluster: workers as Ray tasks, a killed worker retried by Ray, a stopped
driver resumed, and the cluster checks. Each `batchllm submit` runs as its own process (the Ray driver), as a
user's would; results are compared row for row with the local backend's (greedy, one sequence at a time)."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from runner_helpers import (by_id, cli, free_port, jsonl_bytes, job_doc, local_results, read_table, review_rows,
                            write_job)

ROWS = 72
# one sequence at a time, 48 tokens each, small parts: a worker runs for seconds and commits often, so a kill
# or a stop lands mid-shard (as in test_e2e_resume.py)
SECTIONS = dict(name="ray-job", output={"columns": ["text"], "rows_per_part": 3}, engine={"max_num_seqs": 1},
                sampling={"max_tokens": 48, "temperature": 0.0, "ignore_eos": True})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-data") / "reviews.jsonl"
    path.write_bytes(jsonl_bytes(review_rows(ROWS)))
    return path


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, dataset, tmp_path_factory):
    """The local backend's results, by id."""
    return by_id(local_results(tiny_model_dir, dataset, tmp_path_factory.mktemp("ray-baseline"), **SECTIONS,
                               compute={"rows_per_shard": 12}))


def _job(tmp_path, tiny_model_dir, dataset, address, workers, **compute):
    """A ray job whose workers carry a tag of their own in their environment (see _worker_pids)."""
    tag = uuid.uuid4().hex
    ray = {"address": address, "runtime_env": {"env_vars": {"BATCHLLM_TEST_TAG": tag}}}
    doc = job_doc(tiny_model_dir, dataset, tmp_path / "out", **SECTIONS,
                  compute={"backend": "ray", "workers": workers, "rows_per_shard": 12, "grace_period_s": 10,
                           "ray": ray, **compute})
    return write_job(tmp_path / "job.yaml", doc), tag


def _submit(job, env, *args):
    return subprocess.Popen([sys.executable, "-m", "batchllm.cli", "submit", job, "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed_parts(out):
    return len(list((out / "results").glob("*"))) if (out / "results").exists() else 0


def _wait_for_parts(proc, out, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _committed_parts(out) >= at_least:
            return
        assert proc.poll() is None, "the job ended before the test could interrupt it: " + proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no part committed in time")


def _worker_pids(tag):
    """This test's worker children (`python -m batchllm.cli worker ...` with its tag in their environment), never
    another run's."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if b"batchllm.cli" in argv and b"worker" in argv and f"BATCHLLM_TEST_TAG={tag}".encode() in env:
            pids.append(int(pid))
    return pids


def _check(baseline, out):
    results = read_table(str(out / "results"))
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == ROWS, "every row exactly once"
    for r in results:
        b = baseline[r["id"]]
        assert (r["output"], r["completion_tokens"]) == (b["output"], b["completion_tokens"]), r["id"]


def test_workers_run_as_ray_tasks(ray_cluster, tiny_model_dir, dataset, baseline, tmp_path):
    address, env = ray_cluster
    job, _ = _job(tmp_path, tiny_model_dir, dataset, address, workers=2)
    dry = cli("submit", job, "--dry-run")
    assert dry.exit_code == 0 and "ray: 2 task(s)" in dry.output and address in dry.output, dry.output
    p = _submit(job, env)
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output
    for i in range(2):  # each worker's log lines reach the driver through Ray, tagged with its task's name
        assert f"(batchllm-worker-{i} pid=" in output, output
    assert "state      complete" in output
    _check(baseline, tmp_path / "out")


def _kill_mid_run(ray_cluster, tiny_model_dir, dataset, tmp_path, victim):
    """A one-worker job; once it committed two parts, SIGKILL to victim(the worker's pid). (driver, tag, worker)"""
    address, env = ray_cluster
    job, tag = _job(tmp_path, tiny_model_dir, dataset, address, workers=1)
    p = _submit(job, env)
    _wait_for_parts(p, tmp_path / "out", 2)
    pids = _worker_pids(tag)
    assert len(pids) == 1, pids
    os.kill(victim(pids[0]), signal.SIGKILL)
    return p, tag, pids[0]


def _completes_after_one_retry(p, baseline, out) -> str:
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output
    assert output.count("worker 0/1:") == 2, output  # the retry started a new worker, which resumed
    _check(baseline, out)
    return output


def test_a_killed_worker_is_retried_by_ray(ray_cluster, tiny_model_dir, dataset, baseline, tmp_path):
    # an OOM kill or a lost node: no commit, no clean exit
    p, _, _ = _kill_mid_run(ray_cluster, tiny_model_dir, dataset, tmp_path, victim=lambda worker: worker)
    output = _completes_after_one_retry(p, baseline, tmp_path / "out")
    assert "will be retried" in output, output


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_lost_task_process_is_retried_and_its_worker_does_not_linger(ray_cluster, tiny_model_dir, dataset,
                                                                        baseline, tmp_path):
    """The Ray worker process that runs the task dies (as with a lost node): its child worker goes too, Ray runs
    the task again, and the job completes with every row once."""
    # the worker's parent is the Ray worker process that runs the task
    p, tag, child = _kill_mid_run(ray_cluster, tiny_model_dir, dataset, tmp_path, victim=_parent)
    deadline = time.monotonic() + 30
    while child in _worker_pids(tag):
        assert time.monotonic() < deadline, "the worker outlived its task's process"
        time.sleep(0.05)
    _completes_after_one_retry(p, baseline, tmp_path / "out")


def test_a_stopped_driver_leaves_a_job_that_resumes(ray_cluster, tiny_model_dir, dataset, baseline, tmp_path):
    address, env = ray_cluster
    job, tag = _job(tmp_path, tiny_model_dir, dataset, address, workers=2)
    p = _submit(job, env)
    _wait_for_parts(p, tmp_path / "out", 1)
    p.send_signal(signal.SIGINT)  # Ctrl-C: the tasks are cancelled, their workers commit and exit 75
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 75, output
    assert "not finished; run the same command again" in output, output
    for i in range(2):  # each worker got SIGTERM, committed what it had finished, and exited 75
        assert f"worker {i}: exited with 75" in output, output
    assert not _worker_pids(tag), "a worker outlived its cancelled task"
    done = len(read_table(str(tmp_path / "out" / "results")))
    assert 0 < done < ROWS
    p = _submit(job, env)
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output
    assert f"resuming; {done}/{ROWS} rows already committed" in output
    _check(baseline, tmp_path / "out")


def test_cluster_checks_are_one_line_errors(ray_cluster, tiny_model_dir, dataset, tmp_path):
    address, env = ray_cluster
    job, _ = _job(tmp_path, tiny_model_dir, dataset, address, workers=1, gpus_per_worker=1)
    p = _submit(job, env)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: compute.gpus_per_worker: a worker asks for 1 GPU(s) but it has none; set "
                      "compute.gpus_per_worker (0 runs on the CPU with engine.device: cpu), or "
                      "compute.ray.autoscaling: true where GPU nodes start on demand"], output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists(), "a refused job wrote to its output"
    r = cli("submit", _job(tmp_path, tiny_model_dir, dataset, address, workers=1)[0], "--no-wait")
    assert r.exit_code == 2 and r.stderr.startswith("error: --no-wait: the ray backend"), r.stderr
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    p = _submit(_job(tmp_path, tiny_model_dir, dataset, closed, workers=1)[0], env)
    output, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and f"error: compute.ray.address: nothing answers at {closed}" in output, output
    assert not (tmp_path / "out").exists()


def test_a_stop_during_start_up_reaches_the_silent_worker(ray_cluster, tiny_model_dir, dataset, tmp_path):
    """Ctrl-C while the workers load the model (they print nothing yet): each still gets SIGTERM at once, and
    none outlives its task."""
    address, env = ray_cluster
    job, tag = _job(tmp_path, tiny_model_dir, dataset, address, workers=2)
    p = _submit(job, env)
    deadline = time.monotonic() + 60
    while len(_worker_pids(tag)) < 2:
        assert time.monotonic() < deadline and p.poll() is None, "the workers did not start"
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 75, output
    for i in range(2):  # 75, or -15 when SIGTERM came before the worker had set its handler: nothing had started
        assert f"worker {i}: exited with 75" in output or f"worker {i}: exited with -15" in output, output
    assert not _worker_pids(tag)
    # The stop reached them before they finished a row. (A task that waited for its worker's first progress
    # line would have let rows finish, and the worker would have committed them.)
    assert not read_table(str(tmp_path / "out" / "results")), "the stop waited for the workers to speak"
