"""The kubernetes backend without a cluster: the manifests (values, names, the Kubernetes schema), what
`submit --dry-run` prints, the container image's paths, and `run` against a stand-in kubectl.

tests/e2e/test_e2e_kubernetes.py runs pods from the applied manifests against S3 (moto), and follows them.
"""
import json
import os
import re
import sys

import pytest
import yaml

from runner_helpers import cli, write_job

from batchllm.runner.backends import kubernetes
from batchllm.runner.spec import SpecError, load_spec, spec_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
IMAGE = "registry.example.com/batchllm:0.1.0"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_dict(**extra) -> dict:
    doc = {"name": "review-sentiment", "model": {"source": "smollm2-135m"},
           "input": {"uri": "s3://bucket/reviews/"}, "prompt": {"template": "Review: {text}"},
           "output": {"uri": "s3://bucket/labels"},
           "compute": {"backend": "kubernetes", "workers": 4, "kubernetes": {"image": IMAGE}}}
    return _merge(doc, extra)


def k8s_spec(**extra):
    return spec_from_dict(job_dict(**extra))


def parts(spec):
    config, job = kubernetes.manifests(spec)
    assert (config["kind"], job["kind"]) == ("ConfigMap", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return config, job, pod, container


# ---- a stand-in kubectl ------------------------------------------------------------------------------------

FAKE_KUBECTL = r'''#!{python}
"""A stand-in kubectl: records each call and answers from state.json (see FakeKubectl)."""
import json, os, signal, sys

here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
verb = next(a for a in args if a in ("get", "apply", "delete"))
calls = os.path.join(here, "calls.jsonl")
with open(calls, "a") as f:
    f.write(json.dumps({"argv": args, "stdin": sys.stdin.read() if verb == "apply" else ""}) + "\n")
path = os.path.join(here, "state.json")
with open(path) as f:
    state = json.load(f)


def save():
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


if verb in state.get("errors", {}):
    sys.stderr.write(state["errors"][verb] + "\n")
    sys.exit(1)
if verb == "get":
    with open(calls) as f:
        gets = sum("get" in json.loads(line)["argv"] for line in f)
    if gets == state.get("interrupt_on_get"):
        os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C while `submit --wait` follows the Job
    jobs = state["jobs"]
    if len(jobs) > 1:
        state["jobs"] = jobs[1:]
        save()
    if jobs:
        print(json.dumps(jobs[0]))
elif verb == "delete":
    state["jobs"] = []
    save()
else:
    state["jobs"] = state.get("after_apply", [{"status": {"active": 1}}])
    save()
'''


class FakeKubectl:
    """`kubectl` first on PATH. state.json: `jobs`, the Job's states that successive `get`s return (the last one
    stays; [] is no Job); `after_apply`, what `jobs` becomes on apply; `errors`, {verb: stderr line} for verbs
    that fail; `interrupt_on_get`, the nth `get` sends SIGINT to the process that ran it."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir()
        script = folder / "kubectl"
        script.write_text(FAKE_KUBECTL.replace("{python}", sys.executable))
        script.chmod(0o755)
        self.set(jobs=[])

    def set(self, **state):
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")

    def calls(self) -> list[dict]:
        path = self.folder / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def verbs(self) -> list[str]:
        return [next(a for a in c["argv"] if a in ("get", "apply", "delete")) for c in self.calls()]

    def applied(self) -> list[dict]:
        """The manifests of the last apply."""
        return list(yaml.safe_load_all([c for c in self.calls() if "apply" in c["argv"]][-1]["stdin"]))


def job_state(kind="active", reason=None, message=None) -> dict:
    """A Job as `kubectl get job -o json` shows it: "active" (running), "Complete" or "Failed" (ended), or
    "FailureTarget" (failing: its pods are still stopping)."""
    if kind == "active":
        return {"kind": "Job", "status": {"active": 2, "ready": 2}}
    conditions = [{"type": kind, "status": "True", "reason": reason or kind, "message": message or ""}]
    if kind == "Failed":
        conditions.insert(0, dict(conditions[0], type="FailureTarget"))
    return {"kind": "Job", "status": {"conditions": conditions}}


@pytest.fixture()
def kubectl(tmp_path, monkeypatch):
    fake = FakeKubectl(tmp_path / "fake-bin")
    monkeypatch.setenv("PATH", f"{fake.folder}{os.pathsep}{os.environ['PATH']}")
    return fake


# ---- the manifests -----------------------------------------------------------------------------------------

def test_an_indexed_job_of_the_workers_with_retries_and_a_failure_policy():
    spec = k8s_spec(compute={"workers": 4, "max_retries": 5, "grace_period_s": 40})
    config, job, pod, container = parts(spec)
    name = kubernetes.job_name(spec)
    js = job["spec"]
    assert js["completionMode"] == "Indexed"  # Kubernetes sets JOB_COMPLETION_INDEX only in this mode
    assert js["completions"] == js["parallelism"] == 4
    assert js["backoffLimitPerIndex"] == 5 and "backoffLimit" not in js
    assert pod["restartPolicy"] == "Never"  # a retry is a new pod; the failure policy needs Never
    assert js["podReplacementPolicy"] == "Failed"
    assert js["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
    ]
    assert js["ttlSecondsAfterFinished"] >= 3600
    assert pod["terminationGracePeriodSeconds"] > 40  # the worker's own grace must end first
    for obj in (config, job, js["template"]):
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/name": "batchllm", "app.kubernetes.io/instance": name}
    for obj in (config, job):
        assert obj["metadata"]["name"] == name and obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["annotations"] == {"batchllm/job": "review-sentiment",
                                                  "batchllm/output": "s3://bucket/labels"}

    # the container: the worker command on the mounted job file, the model cache, /dev/shm
    assert container["image"] == IMAGE
    assert container["command"] == ["batchllm", "worker", "/etc/batchllm/job.yaml"]
    assert "args" not in container
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    job_mount = mounts[os.path.dirname(container["command"][2])]
    assert job_mount["readOnly"] is True
    assert volumes[job_mount["name"]] == {"name": job_mount["name"], "configMap": {"name": config["metadata"]["name"]}}
    assert config["data"] == {os.path.basename(container["command"][2]): spec.resolved_yaml()}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert volumes[mounts[env["BATCHLLM_HOME"]]["name"]]["emptyDir"] == {}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "envFrom" not in container
    for key in ("serviceAccountName", "nodeSelector", "tolerations"):
        assert key not in pod


@pytest.mark.parametrize("extra, limits", [
    ({}, {"nvidia.com/gpu": 1}),
    ({"compute": {"gpus_per_worker": 2, "kubernetes": {"gpu_resource": "amd.com/gpu"}}}, {"amd.com/gpu": 2}),
    ({"engine": {"device": "cpu"}}, None),
    ({"compute": {"gpus_per_worker": 0}}, None),
])
def test_gpus_per_worker_become_the_pods_gpu_limit(extra, limits):
    *_, container = parts(k8s_spec(**extra))
    assert container["resources"].get("limits") == limits


def test_secret_account_selectors_and_requests():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec = k8s_spec(compute={"kubernetes": {
        "namespace": "batch", "env_from_secret": "s3-creds", "service_account": "batchllm", "cpu": "8",
        "memory": "64Gi", "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": tolerations}})
    config, job, pod, container = parts(spec)
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "8", "memory": "64Gi"}}
    assert pod["serviceAccountName"] == "batchllm"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == tolerations
    assert config["metadata"]["namespace"] == job["metadata"]["namespace"] == "batch"


def test_names_fit_kubernetes_limits_and_name_one_job():
    longest = "a" * 62 + "-"  # 63 characters, ending in '-', which a label value may not
    names = set()
    for name in (longest, "a" * 63, "a" * 62 + "b", "x", "review-sentiment"):
        spec = k8s_spec(name=name)
        k8s = kubernetes.job_name(spec)
        assert DNS_LABEL.match(k8s) and len(k8s) <= 57, k8s
        assert len(f"{k8s}-99999") <= 63  # an Indexed Job's pod hostname, for up to 100,000 workers
        _, job, _, _ = parts(spec)
        assert all(DNS_LABEL.match(v) and len(v) <= 63 for v in job["metadata"]["labels"].values())
        names.add(k8s)
    assert len(names) == 5  # names cut short still differ
    spec = k8s_spec()
    assert kubernetes.job_name(spec) == kubernetes.job_name(k8s_spec())  # a resubmit finds its Job
    assert kubernetes.job_name(spec) == kubernetes.job_name(k8s_spec(compute={"workers": 9}))
    assert kubernetes.job_name(spec) != kubernetes.job_name(k8s_spec(output={"uri": "s3://bucket/2026-11-27"}))


def test_manifests_pass_the_kubernetes_openapi_schema():
    import kubernetes_validate as kv  # the test extra; offline: it carries the schemas
    spec = k8s_spec(compute={"gpus_per_worker": 2, "kubernetes": {
        "env_from_secret": "s3-creds", "service_account": "batchllm", "cpu": "8", "memory": "64Gi",
        "node_selector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    for version in ("1.29", kv.utils.latest_version()):  # the oldest Kubernetes the backend supports, the newest
        for doc in kubernetes.manifests(spec):
            kv.validate(doc, version, strict=True)  # strict: an unknown (misspelt) field fails
    bad = kubernetes.manifests(spec)[1]
    bad["spec"]["backoffLimitPerindex"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.29", strict=True)


def test_dry_run_prints_the_manifests_and_their_job_file_loads_as_the_same_job(tmp_path, kubectl):
    job = write_job(tmp_path / "job.yaml", job_dict(output={"uri": "${OUT_URI}"}, sampling={"max_tokens": 7}))
    r = cli("submit", job, "--dry-run", "--set", "compute.workers=3", env={"OUT_URI": "s3://bucket/out"})
    assert r.exit_code == 0, r.output + r.stderr
    assert kubectl.calls() == []  # nothing applied, nothing read
    docs = list(yaml.safe_load_all(r.stdout))
    spec = load_spec(job, ["compute.workers=3"], env={"OUT_URI": "s3://bucket/out"})
    assert docs == kubernetes.manifests(spec)
    assert docs[1]["spec"]["completions"] == 3
    pod_job = tmp_path / "pod" / "job.yaml"  # the file as a pod sees it: variables filled, overrides applied
    pod_job.parent.mkdir()
    pod_job.write_text(docs[0]["data"]["job.yaml"])
    loaded = load_spec(str(pod_job), env={})
    assert loaded.fingerprint() == spec.fingerprint()
    assert loaded.output.uri == "s3://bucket/out" and loaded.compute.workers == 3
    assert loaded.sampling.max_tokens == 7


def test_the_image_has_what_the_manifests_assume():
    with open(os.path.join(ROOT, "containers", "Dockerfile")) as f:
        dockerfile = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    *_, container = parts(k8s_spec())
    cache = next(e["value"] for e in container["env"] if e["name"] == "BATCHLLM_HOME")
    assert re.search(rf"^ENV BATCHLLM_HOME={re.escape(cache)}\b", dockerfile, re.M)
    assert re.search(rf"mkdir -p {re.escape(cache)}\b", dockerfile)  # there, writable, without the emptyDir too
    assert re.search(r'^ENTRYPOINT \["batchllm"\]$', dockerfile, re.M)
    assert container["command"][0] == "batchllm"
    assert re.search(r'^batchllm = "batchllm.cli:main"$', pyproject, re.M)  # pip puts the script on PATH
    install = re.search(r'pip install [^\n]*"\.\[([a-z0-9,]+)\]"', dockerfile)
    assert install and {"s3", "gcs"} <= set(install.group(1).split(","))
    assert re.search(r"^USER [1-9]", dockerfile, re.M)  # not root


# ---- run, against the stand-in kubectl (no store: these don't wait) ---------------------------------------

def test_run_applies_the_job_when_there_is_none(kubectl):
    spec = k8s_spec(compute={"kubernetes": {"context": "gke-prod", "namespace": "batch"}})
    assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get", "apply"]
    name = kubernetes.job_name(spec)
    get, apply = kubectl.calls()
    for call in (get, apply):
        assert call["argv"][:4] == ["--context", "gke-prod", "--namespace", "batch"]
    assert get["argv"][4:] == ["get", "job", name, "--ignore-not-found", "-o", "json"]
    assert apply["argv"][4:] == ["apply", "--server-side", "--force-conflicts", "--field-manager=batchllm", "-f", "-"]
    assert kubectl.applied() == kubernetes.manifests(spec)


@pytest.mark.parametrize("ended", ["Complete", "Failed"])
def test_run_replaces_a_job_that_ended(kubectl, ended):
    kubectl.set(jobs=[job_state(ended)])
    spec = k8s_spec()
    assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get", "delete", "apply"]
    delete = kubectl.calls()[1]["argv"]
    assert delete[2:5] == ["delete", "job", kubernetes.job_name(spec)]
    assert "--cascade=foreground" in delete and "--wait=true" in delete  # its pods are gone before new ones start
    assert kubectl.applied() == kubernetes.manifests(spec)


@pytest.mark.parametrize("state", ["active", "FailureTarget"])
def test_run_leaves_a_running_job_alone(kubectl, caplog, state):
    kubectl.set(jobs=[job_state(state)])
    with caplog.at_level("INFO", logger="batchllm.runner"):
        assert kubernetes.run(k8s_spec(), "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get"]
    assert "already running" in caplog.text


def test_kubectl_failures_are_one_line(kubectl, monkeypatch, caplog, tmp_path):
    kubectl.set(jobs=[], errors={"get": 'error: context "nope" does not exist'})
    with pytest.raises(SpecError, match=r'^compute.kubernetes.context: kubectl: error: context "nope" does not exist$'):
        kubernetes.run(k8s_spec(compute={"kubernetes": {"context": "nope"}}), "job.yaml", wait=False)

    kubectl.set(jobs=[], errors={"apply": 'Error from server (NotFound): error when creating "STDIN": namespaces '
                                          '"batch" not found'})
    with pytest.raises(SpecError, match=r"^compute.kubernetes.namespace: kubectl: .*namespaces \"batch\" not found$"):
        kubernetes.run(k8s_spec(compute={"kubernetes": {"namespace": "batch"}}), "job.yaml", wait=False)

    refused = "The connection to the server 10.0.0.1:443 was refused - did you specify the right host or port?"
    klog = ('E1126 18:59:42.921987   28683 memcache.go:265] "Unhandled Error" err="couldn\'t get current server '
            'API group list: Get \\"https://10.0.0.1:443/api?timeout=32s\\": dial tcp 10.0.0.1:443: connect: '
            'connection refused"')
    kubectl.set(jobs=[], errors={"get": f"{klog}\n{klog}\n{refused}\nsecond line"})  # as kubectl writes it
    with caplog.at_level("ERROR", logger="batchllm.runner"):
        assert kubernetes.run(k8s_spec(), "job.yaml", wait=False) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [f"kubectl: {refused}"]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SpecError, match=r"kubectl on PATH.*--dry-run"):
        kubernetes.run(k8s_spec(), "job.yaml", wait=False)
