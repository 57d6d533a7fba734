"""The kubernetes backend end to end, without a cluster: `batchllm submit` against S3 (moto) and a stand-in
kubectl (tests/runner/kubectl_stub.py), with this test playing the cluster. It mounts the applied Secret where the
Job says and runs each pod's command as a process with the pod's env and, as Kubernetes does for an Indexed Job,
JOB_COMPLETION_INDEX. That the results come out complete shows the rendered job file, the index and the plan fit
together.
"""
import os
import subprocess
import sys
import threading
import time

import pytest

from kubectl_stub import job_state, kubectl_fixture  # noqa: F401 (the `kubectl` fixture)
from runner_helpers import cli, job_doc, jsonl_bytes, read_table, review_rows, write_job

from batchllm.runner.backends import kubernetes
from batchllm.runner.spec import load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_pods(docs, root) -> list[int]:
    """What the cluster does with the applied manifests; returns each index's exit code."""
    secret = next(d for d in docs if d["kind"] == "Secret")
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}  # mount path in the pod -> a folder here
    for m in container["volumeMounts"]:
        folder = root / m["name"]
        folder.mkdir(parents=True)
        if "secret" in volumes[m["name"]]:
            assert volumes[m["name"]]["secret"]["secretName"] == secret["metadata"]["name"]
            for key, text in secret["stringData"].items():
                (folder / key).write_text(text)
        mounts[m["mountPath"]] = str(folder)

    def here(value):
        for path, folder in mounts.items():
            if value == path or value.startswith(path + "/"):
                return folder + value[len(path):]
        return value

    assert container["command"][0] == "batchllm"
    command = [sys.executable, "-m", "batchllm.cli"] + [here(a) for a in container["command"][1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_DIR", "PATH")}  # the pod's env, not ours
    # the image holds this checkout's batchllm, not whatever an installed copy points at
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env.update({e["name"]: here(e["value"]) for e in container.get("env", [])}, PATH=os.defpath,
               OMP_NUM_THREADS="1")
    cwd = root / "workdir"
    cwd.mkdir()
    procs = []
    for i in range(job["spec"]["completions"]):
        pod_env = dict(env)
        if job["spec"].get("completionMode") == "Indexed":
            pod_env["JOB_COMPLETION_INDEX"] = str(i)
        procs.append(subprocess.Popen(command, env=pod_env, cwd=cwd))
    return [p.wait(timeout=300) for p in procs]


def _job(tmp_path, s3fs_, s3_endpoint, bucket, rows=22, kubernetes=None, **extra):
    s3fs_.mkdir(bucket)
    s3fs_.pipe(f"{bucket}/in/reviews.jsonl", jsonl_bytes(review_rows(rows)))
    k8s = {"image": "registry.example.com/batchllm:test", "namespace": "batch", **(kubernetes or {})}
    doc = job_doc("smollm2-135m", f"s3://{bucket}/in/reviews.jsonl", f"s3://{bucket}/out", name=bucket,
                  compute={"backend": "kubernetes", "workers": 3, "rows_per_shard": 4, "kubernetes": k8s},
                  storage={"endpoint_url": s3_endpoint}, **extra)
    return write_job(tmp_path / "job.yaml", doc)


def _errors(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def _fingerprint(job) -> str:
    return load_spec(str(job)).fingerprint()[:6]


@pytest.mark.timeout(300)
def test_submit_applies_the_job_and_its_pods_complete_it(tiny_model_dir, s3fs_, s3_endpoint, kubectl, tmp_path,
                                                         monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-e2e", model={"source": str(tiny_model_dir)})
    monkeypatch.setattr(kubernetes, "POLL_S", 0.2)
    kubectl.set(jobs=[], on_apply={"jobs": [job_state("active")]})
    cluster, bar = {}, []
    update = kubernetes.Bar.update
    monkeypatch.setattr(kubernetes.Bar, "update", lambda self, n: (bar.append(n), update(self, n)))

    def play_the_cluster():  # once the Job is applied: run its pods, then report the Job as Kubernetes would
        codes = None
        try:
            deadline = time.monotonic() + 120
            while "apply" not in kubectl.verbs() and time.monotonic() < deadline:
                time.sleep(0.05)
            codes = run_pods(kubectl.applied(), tmp_path / "cluster")
        finally:  # also when this thread fails: submit, following, must end
            cluster["codes"] = codes
            kubectl.set(jobs=[job_state("Complete" if codes and set(codes) == {0} else "Failed")])

    thread = threading.Thread(target=play_the_cluster, daemon=True)
    thread.start()
    r = cli("submit", str(job), "--no-progress")
    thread.join(timeout=10)
    assert cluster.get("codes") == [0, 0, 0], r.stderr
    assert r.exit_code == 0, r.output + r.stderr
    assert "state      complete" in r.output and "22/22 rows" in r.output
    assert sum(bar) == 22  # the bar follows the checkpoints
    verbs = kubectl.verbs()
    assert verbs[:4] == ["get job", "apply", "delete secret", "get job"] and set(verbs[3:]) == {"get job"}
    assert all(c["argv"][:2] == ["--namespace", "batch"] for c in kubectl.calls())

    results = read_table("s3://k8s-e2e/out/results", storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(x["id"] for x in results) == list(range(22))  # each row exactly once
    r = cli("status", job)
    assert r.exit_code == 0 and "shards 6/6 complete" in r.output
    r = cli("submit", job, "--no-progress")  # finished: nothing to apply
    assert r.exit_code == 0 and "nothing to do" in r.output and "apply" not in kubectl.verbs()[len(verbs):]


def test_submit_without_wait_applies_and_returns(s3fs_, s3_endpoint, kubectl, tmp_path):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-nowait")
    r = cli("submit", job, "--no-wait")
    assert r.exit_code == 0, r.output + r.stderr
    assert kubectl.verbs() == ["get job", "apply", "delete secret"]
    assert "started; follow with `batchllm status s3://k8s-nowait/out`" in r.output
    assert "kubectl --namespace batch get pods -l app.kubernetes.io/instance=batchllm-k8s-nowait-" in r.stderr
    assert s3fs_.exists("k8s-nowait/out/_batchllm/plan.json")  # planned before the pods start


@pytest.mark.timeout(60)  # following must end
def test_a_failed_job_fails_submit_with_its_reason(s3fs_, s3_endpoint, kubectl, tmp_path, monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-failed")
    monkeypatch.setattr(kubernetes, "POLL_S", 0.05)
    # exit 2 in one pod fails its index (FailIndex); the others finish; the Job ends Failed
    kubectl.set(jobs=[], on_apply={"jobs": [job_state("active"), job_state("Failed", "FailedIndexes",
                                                                             "Job has failed indexes")]})
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 1, r.output + r.stderr
    name = f"batchllm-k8s-failed-{_fingerprint(job)}"
    assert (f"job/{name} failed: FailedIndexes: Job has failed indexes (logs: kubectl --namespace batch logs -l "
            f"app.kubernetes.io/instance={name} --prefix)") in r.stderr
    assert "state      pending" in r.output
    assert kubectl.verbs() == ["get job", "apply", "delete secret", "get job", "get job"]


@pytest.mark.timeout(60)  # following must end
def test_an_interrupt_stops_following_and_leaves_the_running_job(s3fs_, s3_endpoint, kubectl, tmp_path, monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-interrupt", kubernetes={"context": "gke-prod"})
    monkeypatch.setattr(kubernetes, "POLL_S", 0.05)
    kubectl.set(jobs=[job_state("active")], interrupt_on_get=3)  # already running; Ctrl-C while following
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 75, r.output + r.stderr
    name = f"batchllm-k8s-interrupt-{_fingerprint(job)}"
    assert "already running" in r.stderr
    assert (f"stopped following; job/{name} keeps running (`kubectl --namespace batch --context gke-prod delete job "
            f"{name}` stops it; submit again to follow it)") in r.stderr
    assert set(kubectl.verbs()) == {"get job"}  # neither deleted nor replaced


@pytest.mark.timeout(60)  # following must end
def test_losing_the_api_server_stops_following_with_75(s3fs_, s3_endpoint, kubectl, tmp_path, monkeypatch):
    """The Job may still run: a resubmit follows it again, so this is 75 (stopped early), not 1 (failed)."""
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-lost", kubernetes={"context": "gke-prod"})
    monkeypatch.setattr(kubernetes, "POLL_S", 0.05)
    monkeypatch.setattr(kubernetes, "MAX_MISSES", 3)
    refused = "The connection to the server 10.0.0.1:443 was refused - did you specify the right host or port?"
    kubectl.set(jobs=[], on_apply={"jobs": [job_state("active")], "errors": {"get job": refused}})
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 75, r.output + r.stderr
    assert kubectl.verbs() == ["get job", "apply", "delete secret"] + ["get job"] * 3
    name = f"batchllm-k8s-lost-{_fingerprint(job)}"
    (line,) = [s for s in r.stderr.splitlines() if " ERROR " in s]
    assert line.endswith(f"kubectl: {refused}; lost contact with the cluster, so stopped following; job/{name} may "
                         f"still be running: submit again to follow it (or `kubectl --namespace batch --context "
                         f"gke-prod get job {name}`)")


def test_a_job_running_with_another_job_file_exits_2_in_one_line(s3fs_, s3_endpoint, kubectl, tmp_path):
    """Kubernetes refuses another pod template (another job file: here another worker count) on a Job that
    exists; submit says which Job to wait for or delete, with the namespace."""
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-immutable")
    name = f"batchllm-k8s-immutable-{_fingerprint(job)}"
    kubectl.set(jobs=[], errors={"apply": f'Error from server (Invalid): Job.batch "{name}" is invalid: '
                                          'spec.template: Invalid value: core.PodTemplateSpec{}: '
                                          'field is immutable'})
    r = cli("submit", job, "--set", "compute.workers=5")
    assert r.exit_code == 2, r.output + r.stderr
    assert _errors(r) == [(f"error: job/{name} is running with a different job file; wait for it to end, or stop "
                           f"it with `kubectl --namespace batch delete job {name}`, then submit again")]
    assert "Traceback" not in r.stderr


def test_kubectl_missing_is_one_line_and_exit_2_before_anything_is_written(s3fs_, s3_endpoint, tmp_path,
                                                                          monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-nokubectl")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = cli("submit", job)
    assert r.exit_code == 2
    assert _errors(r) == [f"error: {kubernetes.NO_KUBECTL}"] and "Traceback" not in r.stderr
    s3fs_.invalidate_cache()
    assert not s3fs_.exists("k8s-nokubectl/out")  # check() ran before the plan was stored
    r = cli("submit", job, "--dry-run")  # the manifests need no kubectl
    assert r.exit_code == 0 and "kind: Secret" in r.output
