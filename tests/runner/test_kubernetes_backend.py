"""The kubernetes backend without a cluster: the manifests (values, names, the Kubernetes schema), what
`submit --dry-run` prints, the container image's paths, check(), and `run` against a stand-in kubectl
(kubectl_stub.py).

tests/e2e/test_e2e_kubernetes.py runs pods from the applied manifests against S3 (moto), and follows them.
"""
import hashlib
import os
import re

import pytest
import yaml

from kubectl_stub import job_state, kubectl_fixture  # noqa: F401 (the `kubectl` fixture)
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
    assert (config["kind"], job["kind"]) == ("Secret", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return config, job, pod, container


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
        # exit 2: that index stops retrying, the others finish, the Job ends Failed (not FailJob: every pod killed)
        {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [2]}},
    ]
    assert js["ttlSecondsAfterFinished"] >= 3600
    assert pod["terminationGracePeriodSeconds"] > 40  # the worker's own grace must end first
    for obj in (config, job, js["template"]):
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/name": "batchllm", "app.kubernetes.io/instance": name}
    assert job["metadata"]["name"] == name
    for obj in (config, job):
        assert obj["metadata"]["namespace"] == "default"
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
    # the job file: in an immutable Secret named after the job and the file's hash (its variables are filled in)
    job_yaml = spec.resolved_yaml()
    assert config["metadata"]["name"] == f"{name}-{hashlib.sha256(job_yaml.encode()).hexdigest()[:8]}"
    assert config["type"] == "Opaque" and config["immutable"] is True
    assert config["stringData"] == {os.path.basename(container["command"][2]): job_yaml} and "data" not in config
    secret = {"secretName": config["metadata"]["name"]}
    assert volumes[job_mount["name"]] == {"name": job_mount["name"], "secret": secret}
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
        config, job, _, _ = parts(spec)
        assert all(DNS_LABEL.match(v) and len(v) <= 63 for v in job["metadata"]["labels"].values())
        secret = config["metadata"]["name"]
        assert DNS_LABEL.match(secret) and len(secret) <= 63, secret
        assert secret.endswith(kubernetes.job_name(spec)[-7:] + "-" + secret[-8:])  # the job's fingerprint kept
        if len(k8s) <= 54:
            assert secret == f"{k8s}-{secret[-8:]}"
        names.add(k8s)
    assert len(names) == 5  # names cut short still differ
    spec = k8s_spec()
    assert kubernetes.job_name(spec) == kubernetes.job_name(k8s_spec())  # a resubmit finds its Job
    assert kubernetes.job_name(spec) == kubernetes.job_name(k8s_spec(compute={"workers": 9}))
    assert kubernetes.job_name(spec) != kubernetes.job_name(k8s_spec(output={"uri": "s3://bucket/2026-11-27"}))


def test_another_job_file_is_another_secret_and_another_pod_template():
    """A running Job can't take another job file (another worker count: two workers on one shard): its pod
    template, which Kubernetes keeps immutable, names the job file's Secret."""
    base = kubernetes.manifests(k8s_spec())
    assert kubernetes.manifests(k8s_spec()) == base  # the same job file: the same manifests, a no-op apply
    for extra in ({"compute": {"workers": 9}}, {"compute": {"kubernetes": {"image": IMAGE + "-2"}}},
                  {"storage": {"options": {"key": "rotated"}}}):
        spec = k8s_spec(**extra)
        assert kubernetes.job_name(spec) == kubernetes.job_name(k8s_spec())  # the same Job ...
        secret, job = kubernetes.manifests(spec)
        assert secret["metadata"]["name"] != base[0]["metadata"]["name"]  # ... another Secret ...
        assert job["spec"]["template"] != base[1]["spec"]["template"]  # ... so another pod template
        assert secret["metadata"]["labels"] == base[0]["metadata"]["labels"]  # deleted by the same selector


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
    bad = kubernetes.manifests(spec)[1]  # a secret volume names its Secret `secretName`, a configMap one `name`
    bad["spec"]["template"]["spec"]["volumes"][0]["secret"] = {"name": "x"}
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
    pod_job.write_text(docs[0]["stringData"]["job.yaml"])
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


# ---- check, and the model warning -------------------------------------------------------------------------

def test_check_needs_kubectl_on_path_and_asks_it_nothing(kubectl, monkeypatch, tmp_path):
    spec = k8s_spec()
    kubernetes.check(spec, True)
    kubernetes.check(spec, False)
    assert kubectl.calls() == []  # no I/O: check runs before the plan is written
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SpecError, match=r"^compute.backend: kubernetes needs kubectl on PATH.*--dry-run[^\n]*$"):
        kubernetes.check(spec, True)


@pytest.mark.parametrize("source, warned", [
    ("models/tiny", True),  # a relative path on this machine (model.source is no longer made absolute)
    ("/data/models/tiny", True),
    ("qwen2.5-0.5b-instruct", True),  # a name in this machine's model cache
    ("smollm2-135m", False),  # a built-in alias: the pod pulls it from PyPI
    ("s3://models/tiny", False),
    ("gs://models/tiny", False),
    ("hf:Qwen/Qwen2.5-0.5B-Instruct", False),
])
def test_a_model_source_the_pods_cant_fetch_is_warned_about(kubectl, caplog, source, warned):
    spec = k8s_spec(model={"source": source})
    with caplog.at_level("WARNING", logger="batchllm.runner"):
        kubernetes.check(spec, True)
        kubernetes.describe(spec, "job.yaml")
    expected = (f"model.source {source} is not an alias or a remote source: the pods need it inside their image "
                f"(or use s3://, gs:// or hf:)")
    assert [r.getMessage() for r in caplog.records] == ([expected] * 2 if warned else [])


# ---- run, against the stand-in kubectl (no store: these don't wait) ---------------------------------------

def _cleanup_argv(spec):
    name = kubernetes.job_name(spec)
    return ["delete", "secret", "-l", f"app.kubernetes.io/instance={name}", "--field-selector",
            f"metadata.name!={kubernetes.manifests(spec)[0]['metadata']['name']}", "--ignore-not-found"]


def test_run_applies_the_job_when_there_is_none(kubectl, caplog):
    spec = k8s_spec(compute={"kubernetes": {"context": "gke-prod", "namespace": "batch"}})
    with caplog.at_level("INFO", logger="batchllm.runner"):
        assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get job", "apply", "delete secret"]
    name = kubernetes.job_name(spec)
    get, apply, cleanup = kubectl.calls()
    for call in (get, apply, cleanup):
        assert call["argv"][:4] == ["--namespace", "batch", "--context", "gke-prod"]
    assert get["argv"][4:] == ["get", "job", name, "--ignore-not-found", "-o", "json"]
    assert apply["argv"][4:] == ["apply", "--server-side", "--force-conflicts", "--field-manager=batchllm", "-f", "-"]
    assert kubectl.applied() == kubernetes.manifests(spec)
    # then the job's Secrets of earlier job files go; the one the Job mounts stays
    assert cleanup["argv"][4:] == _cleanup_argv(spec)
    # the hints name the namespace and the context
    prefix = "kubectl --namespace batch --context gke-prod"
    assert (f"pods: {prefix} get pods -l app.kubernetes.io/instance={name}; logs: {prefix} logs -l "
            f"app.kubernetes.io/instance={name} --prefix") in caplog.text


def test_kubectl_commands_in_messages_name_the_namespace_and_context():
    assert kubernetes.kubectl_text(k8s_spec().compute.kubernetes) == "kubectl --namespace default"
    k8s = k8s_spec(compute={"kubernetes": {"namespace": "batch", "context": "arn:aws:eks:us-east-1:1:cluster/a b"}})
    assert kubernetes.kubectl_text(k8s.compute.kubernetes) == \
        "kubectl --namespace batch --context 'arn:aws:eks:us-east-1:1:cluster/a b'"  # quoted for a shell


@pytest.mark.parametrize("ended", ["Complete", "Failed"])
def test_run_replaces_a_job_that_ended_and_its_old_secrets(kubectl, ended):
    kubectl.set(jobs=[job_state(ended, secret="batchllm-review-sentiment-abcdef-00000000")])
    spec = k8s_spec()
    assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get job", "delete job", "apply", "delete secret"]
    delete = kubectl.calls()[1]["argv"]
    assert delete[2:5] == ["delete", "job", kubernetes.job_name(spec)]
    assert "--cascade=foreground" in delete and "--wait=true" in delete  # its pods are gone before new ones start
    assert kubectl.applied() == kubernetes.manifests(spec)
    assert kubectl.calls()[3]["argv"][2:] == _cleanup_argv(spec)


def test_failing_to_delete_old_secrets_only_warns(kubectl, caplog):
    kubectl.set(jobs=[], errors={"delete secret": 'Error from server (Forbidden): secrets is forbidden'})
    with caplog.at_level("WARNING", logger="batchllm.runner"):
        assert kubernetes.run(k8s_spec(), "job.yaml", wait=False) == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("kubectl: Error from server (Forbidden)") and "delete secret -l" in warning


@pytest.mark.parametrize("state", ["active", "FailureTarget"])
def test_run_leaves_a_running_job_alone(kubectl, caplog, state):
    spec = k8s_spec()
    kubectl.set(jobs=[job_state(state, secret=kubernetes.manifests(spec)[0]["metadata"]["name"])])
    with caplog.at_level("INFO", logger="batchllm.runner"):
        assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get job"]
    assert "already running" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_running_job_with_another_job_file_is_followed_with_a_warning(kubectl, caplog):
    spec = k8s_spec(compute={"workers": 8, "kubernetes": {"namespace": "batch"}})
    old = kubernetes.manifests(k8s_spec(compute={"workers": 4, "kubernetes": {"namespace": "batch"}}))
    kubectl.set(jobs=[job_state("active", secret=old[0]["metadata"]["name"])])
    with caplog.at_level("INFO", logger="batchllm.runner"):
        assert kubernetes.run(spec, "job.yaml", wait=False) == 0
    assert kubectl.verbs() == ["get job"]  # neither applied nor deleted: the running Job's Secret stays
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    name = kubernetes.job_name(spec)
    assert "another job file" in warning and f"`kubectl --namespace batch delete job {name}`" in warning


def test_a_job_running_with_another_job_file_refuses_the_apply_in_one_line(kubectl):
    """Kubernetes refuses a changed pod template on an existing Job (here: applied between the get and the
    apply); the refusal is one line naming the way out, exit 2."""
    spec = k8s_spec(compute={"kubernetes": {"namespace": "batch", "context": "gke-prod"}})
    name = kubernetes.job_name(spec)
    refusal = (f'Error from server (Invalid): Job.batch "{name}" is invalid: spec.template: Invalid value: '
               f'core.PodTemplateSpec{{ObjectMeta:v1.ObjectMeta{{Name:"", GenerateName:""}}}}: field is immutable')
    kubectl.set(jobs=[], errors={"apply": f"secret/{name}-0123abcd serverside-applied\n{refusal}"})
    with pytest.raises(SpecError) as e:
        kubernetes.run(spec, "job.yaml", wait=False)
    assert str(e.value) == (f"job/{name} is running with a different job file; wait for it to end, or stop it with "
                            f"`kubectl --namespace batch --context gke-prod delete job {name}`, then submit again")
    assert kubectl.verbs() == ["get job", "apply"]  # the running Job's Secret is left alone


def test_kubectl_failures_are_one_line(kubectl, monkeypatch, caplog, tmp_path):
    kubectl.set(jobs=[], errors={"get job": 'error: context "nope" does not exist'})
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
    kubectl.set(jobs=[], errors={"get job": f"{klog}\n{klog}\n{refused}\nsecond line"})  # as kubectl writes it
    with caplog.at_level("ERROR", logger="batchllm.runner"):
        assert kubernetes.run(k8s_spec(), "job.yaml", wait=False) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [f"kubectl: {refused}"]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SpecError, match=r"kubectl on PATH.*--dry-run"):
        kubernetes.run(k8s_spec(), "job.yaml", wait=False)
