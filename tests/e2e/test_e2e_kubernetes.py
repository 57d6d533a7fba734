"""The kubernetes backend end to end, without a cluster: `batchllm submit` against S3 (moto) and a stand-in
kubectl, with this test playing the cluster. It mounts the applied ConfigMap where the Job says and runs each
pod's command as a process with the pod's env and, as Kubernetes does for an Indexed Job, JOB_COMPLETION_INDEX.
That the results come out complete shows the rendered job file, the index and the plan fit together.
"""
import os
import subprocess
import sys
import threading
import time

import pytest

from runner_helpers import cli, job_doc, jsonl_bytes, read_table, review_rows, write_job
from test_kubernetes_backend import FakeKubectl, job_state

from batchllm.runner.backends import kubernetes


@pytest.fixture()
def kubectl(tmp_path, monkeypatch):
    fake = FakeKubectl(tmp_path / "fake-bin")
    monkeypatch.setenv("PATH", f"{fake.folder}{os.pathsep}{os.environ['PATH']}")
    return fake


def run_pods(docs, root) -> list[int]:
    """What the cluster does with the applied manifests; returns each index's exit code."""
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}  # mount path in the pod -> a folder here
    for m in container["volumeMounts"]:
        folder = root / m["name"]
        folder.mkdir(parents=True)
        if "configMap" in volumes[m["name"]]:
            assert volumes[m["name"]]["configMap"]["name"] == config["metadata"]["name"]
            for key, text in config["data"].items():
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


def _job(tmp_path, s3fs_, s3_endpoint, bucket, rows=22, **extra):
    s3fs_.mkdir(bucket)
    s3fs_.pipe(f"{bucket}/in/reviews.jsonl", jsonl_bytes(review_rows(rows)))
    doc = job_doc("smollm2-135m", f"s3://{bucket}/in/reviews.jsonl", f"s3://{bucket}/out", name=bucket,
                  compute={"backend": "kubernetes", "workers": 3, "rows_per_shard": 4,
                           "kubernetes": {"image": "registry.example.com/batchllm:test", "namespace": "batch"}},
                  storage={"endpoint_url": s3_endpoint}, **extra)
    return write_job(tmp_path / "job.yaml", doc)


def _errors(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(300)
def test_submit_applies_the_job_and_its_pods_complete_it(tiny_model_dir, s3fs_, s3_endpoint, kubectl, tmp_path,
                                                         monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-e2e", model={"source": str(tiny_model_dir)})
    monkeypatch.setattr(kubernetes, "POLL_S", 0.2)
    kubectl.set(jobs=[], after_apply=[job_state("active")])
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
    assert verbs[:3] == ["get", "apply", "get"] and set(verbs[2:]) == {"get"}  # then only followed
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
    assert kubectl.verbs() == ["get", "apply"]
    assert "started; follow with `batchllm status s3://k8s-nowait/out`" in r.output
    assert "kubectl --namespace batch get pods -l app.kubernetes.io/instance=batchllm-k8s-nowait-" in r.stderr
    assert s3fs_.exists("k8s-nowait/out/_batchllm/plan.json")  # planned before the pods start


@pytest.mark.timeout(60)  # following must end
def test_a_failed_job_fails_submit_with_its_reason(s3fs_, s3_endpoint, kubectl, tmp_path, monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-failed")
    monkeypatch.setattr(kubernetes, "POLL_S", 0.05)
    message = "Container worker for pod batch/x-1-abcde failed with exit code 2 matching FailJob rule at index 0"
    kubectl.set(jobs=[], after_apply=[job_state("active"), job_state("Failed", "PodFailurePolicy", message)])
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 1, r.output + r.stderr
    assert f"failed: PodFailurePolicy: {message}" in r.stderr
    assert "state      pending" in r.output
    assert kubectl.verbs() == ["get", "apply", "get", "get"]


@pytest.mark.timeout(60)  # following must end
def test_an_interrupt_stops_following_and_leaves_the_running_job(s3fs_, s3_endpoint, kubectl, tmp_path, monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-interrupt")
    monkeypatch.setattr(kubernetes, "POLL_S", 0.05)
    kubectl.set(jobs=[job_state("active")], interrupt_on_get=3)  # already running; Ctrl-C while following
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 75, r.output + r.stderr
    assert "already running" in r.stderr and "keeps running" in r.stderr
    assert set(kubectl.verbs()) == {"get"}  # neither deleted nor replaced


def test_kubectl_missing_is_one_line_and_exit_2(s3fs_, s3_endpoint, tmp_path, monkeypatch):
    job = _job(tmp_path, s3fs_, s3_endpoint, "k8s-nokubectl")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = cli("submit", job)
    assert r.exit_code == 2
    assert len(_errors(r)) == 1 and "kubectl" in _errors(r)[0] and "Traceback" not in r.stderr
