"""The `kubernetes` backend: a job's workers as one Kubernetes Indexed Job, applied with kubectl.

`batchllm submit job.yaml` (compute.backend: kubernetes) plans the job in its output store, then applies an
immutable Secret holding the resolved job file (named after the job and a hash of that file) and a batch/v1 Job
of compute.workers pods in Indexed completion mode. Each pod runs `batchllm worker /etc/batchllm/job.yaml` in
compute.kubernetes.image (containers/Dockerfile); Kubernetes sets JOB_COMPLETION_INDEX, which the worker takes
as its index. A changed job file changes the pod template, which Kubernetes refuses on an existing Job: a
running Job never gets a second set of workers with another worker count. With --wait (the default) submit
follows the Job: the bar moves with the shard checkpoints, the Job's conditions say when it ended.
`batchllm submit job.yaml --dry-run` prints the manifests instead, for GitOps, Argo or Airflow; workers then
plan the job themselves.

Needs kubectl (its current context, or compute.kubernetes.context) and Kubernetes 1.29 or newer (per-index
retries and the pod failure policy). Pods get storage credentials from compute.kubernetes.env_from_secret or
their service account.
"""
import hashlib
import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import threading

import yaml

from batchllm.models.sources import ALIASES, is_remote
from batchllm.runner.backends.local import Bar, on_stop
from batchllm.runner.checkpoint import load_all
from batchllm.runner.manifest import summarize
from batchllm.runner.plan import PLAN
from batchllm.runner.spec import SpecError
from batchllm.runner.storage import Store
from batchllm.runner.worker import EXIT_FAILED, EXIT_OK, EXIT_RETRY

log = logging.getLogger("batchllm.runner")

POLL_S = 10.0  # how often --wait reads the Job and the checkpoints
MAX_MISSES = 6  # failed `kubectl get`s in a row (an API server blip) before following gives up
CONFIG_DIR = "/etc/batchllm"  # the Secret's job.yaml, read-only
CACHE_DIR = "/var/cache/batchllm"  # BATCHLLM_HOME in the pods (an emptyDir); containers/Dockerfile agrees
TTL_S = 86400  # a finished Job (and its pods' logs) stays a day
EXIT_MARGIN_S = 10  # the worker commits within grace_period_s; then the interpreter exits
NO_KUBECTL = ("compute.backend: kubernetes needs kubectl on PATH; or write the manifests with "
              "`batchllm submit JOB --dry-run > manifests.yaml` and apply them your way")

# kubectl errors that are the job file's to fix (exit 2), by the field to fix
_USAGE = ((re.compile(r'context "[^"]*" does not exist|no context exists|current-context'), "context"),
          (re.compile(r'namespaces? "[^"]*" not found'), "namespace"))
_KLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # kubectl's own log lines, which come before its message


class KubectlError(Exception):
    """kubectl failed; str() is the first line of its message, .stderr all of it."""

    def __init__(self, line: str, stderr: str = ""):
        super().__init__(line)
        self.stderr = stderr


def job_name(spec) -> str:
    """`batchllm-<name>-<fingerprint[:6]>`, at most 57 characters. One name per job: a resubmit finds its Job,
    a job writing elsewhere (Airflow's daily output) gets its own. 57 leaves room for the pods' hostnames,
    `<job>-<index>`, within 63."""
    return f"batchllm-{spec.name}"[:50].rstrip("-") + "-" + spec.fingerprint()[:6]


def secret_name(spec, job_yaml: str) -> str:
    """`<job name>-<8 hex digits of the job file's sha256>`, at most 63 characters (a long job name gives up
    characters before its fingerprint). Another job file (another worker count, image, credential) is another
    Secret, so the Job's pod template changes with it, and Kubernetes refuses that on a running Job."""
    head, fingerprint = job_name(spec).rsplit("-", 1)
    digest = hashlib.sha256(job_yaml.encode()).hexdigest()[:8]
    return f"{head[:63 - 2 - len(fingerprint) - len(digest)].rstrip('-')}-{fingerprint}-{digest}"


def kubectl_args(k8s) -> list[str]:
    """kubectl's flags for compute.kubernetes: the namespace, and the context when one is set."""
    return ["--namespace", k8s.namespace] + (["--context", k8s.context] if k8s.context else [])


def kubectl_text(k8s) -> str:
    """`kubectl --namespace NS [--context C]`, the start of every kubectl command a message suggests."""
    return shlex.join(["kubectl"] + kubectl_args(k8s))


def manifests(spec) -> list[dict]:
    """The Secret with the resolved job file and the Indexed Job that runs compute.workers workers."""
    k8s, compute, name = spec.compute.kubernetes, spec.compute, job_name(spec)
    job_yaml = spec.resolved_yaml()
    secret = secret_name(spec, job_yaml)

    def meta(name):  # fresh dicts: shared ones would come out of the YAML dump as anchors
        return {"name": name, "namespace": k8s.namespace, "labels": labels(),
                "annotations": {"batchllm/job": spec.name, "batchllm/output": spec.output.uri}}

    def labels():
        return {"app.kubernetes.io/name": "batchllm", "app.kubernetes.io/instance": name}

    resources = {}
    if spec.gpus_per_worker():
        resources["limits"] = {k8s.gpu_resource: spec.gpus_per_worker()}
    requests = {key: value for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)) if value}
    if requests:
        resources["requests"] = requests
    container = {
        "name": "worker",
        "image": k8s.image,
        "command": ["batchllm", "worker", f"{CONFIG_DIR}/job.yaml"],
        "env": [{"name": "BATCHLLM_HOME", "value": CACHE_DIR}],  # models are pulled into the pod's emptyDir
        "resources": resources,
        "volumeMounts": [{"name": "job", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "cache", "mountPath": CACHE_DIR},
                         {"name": "dshm", "mountPath": "/dev/shm"}],  # the runtime's default 64 MB is too small
    }
    if k8s.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": k8s.env_from_secret}}]
    pod = {
        "restartPolicy": "Never",  # a failed worker is retried as a new pod (backoffLimitPerIndex)
        "terminationGracePeriodSeconds": math.ceil(compute.grace_period_s) + EXIT_MARGIN_S,
        "containers": [container],
        "volumes": [{"name": "job", "secret": {"secretName": secret}},
                    {"name": "cache", "emptyDir": {}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    if k8s.node_selector:
        pod["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod["tolerations"] = [dict(t) for t in k8s.tolerations]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(name), "spec": {
        "completionMode": "Indexed",
        "completions": compute.workers,
        "parallelism": compute.workers,
        "backoffLimitPerIndex": compute.max_retries,
        "podReplacementPolicy": "Failed",  # a retry starts once the old pod is gone: one pod per shard at a time
        "podFailurePolicy": {"rules": [
            # preemption, eviction, node drain: the worker committed and exited 75; not the worker's fault
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # exit 2 (a spec error; a model fetch that failed on its way is 75): that index stops retrying, the
            # others finish their shards, the Job ends Failed, and a resubmit resumes. Not FailJob, which would
            # stop every pod. Exit 1, 75 and crashes count against backoffLimitPerIndex.
            {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [2]}},
        ]},
        "ttlSecondsAfterFinished": TTL_S,
        "template": {"metadata": {"labels": labels()}, "spec": pod},
    }}
    # a Secret: the job file has its variables filled in (storage.options credentials, a Pushgateway URL)
    config = {"apiVersion": "v1", "kind": "Secret", "metadata": meta(secret), "type": "Opaque", "immutable": True,
              "stringData": {"job.yaml": job_yaml}}
    return [config, job]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings in block style, so the Secret's job.yaml reads as the file it is; no anchors."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _stream(docs) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def describe(spec, job_path: str, overrides=()) -> str:
    """The manifests as the YAML stream `kubectl apply -f -` takes (`batchllm submit --dry-run`). They hold the
    resolved job file, variables filled in: the user's own values."""
    _warn_model_source(spec)
    return (f"# batchllm job {spec.name}: {kubectl_text(spec.compute.kubernetes)} apply --server-side -f this file; "
            f"progress: batchllm status {spec.output.uri}\n" + _stream(manifests(spec)))


def check(spec, wait: bool):
    """Refusals due before anything is written, without asking the cluster: kubectl must be on PATH. Also warns
    when the pods can't fetch the model."""
    if shutil.which("kubectl") is None:
        raise SpecError(NO_KUBECTL)
    _warn_model_source(spec)


def _warn_model_source(spec):
    """A pod fetches a built-in alias (from PyPI) or a remote source; a path or a cache name on this machine means
    nothing there unless the image has it."""
    source = spec.model.source
    if source not in ALIASES and not is_remote(source):
        log.warning("model.source %s is not an alias or a remote source: the pods need it inside their image "
                    "(or use s3://, gs:// or hf:)", source)


class _Kubectl:
    def __init__(self, k8s):
        exe = shutil.which("kubectl")
        if exe is None:  # check() said so first
            raise SpecError(NO_KUBECTL)
        self.base = [exe] + kubectl_args(k8s)

    def __call__(self, *args, stdin=None) -> str:
        p = subprocess.run(self.base + list(args), input=stdin, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            lines = [s.strip() for s in p.stderr.splitlines() if s.strip()]
            line = next((s for s in lines if not _KLOG.match(s)), lines[-1] if lines else f"exit code {p.returncode}")
            for pattern, field in _USAGE:
                if pattern.search(line):
                    raise SpecError(f"compute.kubernetes.{field}: kubectl: {line}")
            raise KubectlError(line, p.stderr)
        return p.stdout

    def job(self, name):
        """The Job as a dict, or None when there is none."""
        out = self("get", "job", name, "--ignore-not-found", "-o", "json")
        return json.loads(out) if out.strip() else None


def _ended(job):
    """The Job's Complete or Failed condition, or None while it runs (FailureTarget: its pods still stop)."""
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c
    return None


def _job_secret(job):
    """The Secret a Job's pods mount their job file from (None for a Job that isn't batchllm's)."""
    volumes = job.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
    return next((v["secret"].get("secretName") for v in volumes if v.get("name") == "job" and "secret" in v), None)


def run(spec, job_path: str, overrides=(), wait=True, initial=0, total=0, show_progress=True) -> int:
    """Apply the job (a running Job of the same job is left alone and followed); with wait, follow it to its end:
    0 complete, 1 failed, 75 stopped following (the Job may run on). check() has run."""
    k8s = spec.compute.kubernetes
    kubectl, name, ns, cmd = _Kubectl(k8s), job_name(spec), k8s.namespace, kubectl_text(k8s)
    docs = manifests(spec)
    secret = docs[0]["metadata"]["name"]
    try:
        job = kubectl.job(name)
        if job is not None and _ended(job) is None:
            log.info("job/%s is already running in namespace %s; left as it is", name, ns)
            if _job_secret(job) not in (None, secret):
                log.warning("job/%s runs with another job file than this one (Secret %s, not %s); following it as "
                            "it is; to run this one, wait for it to end or stop it (`%s delete job %s`) and submit "
                            "again", name, _job_secret(job), secret, cmd, name)
        else:
            if job is not None:  # a resubmit after a failure: the new pods resume from the checkpoints
                log.info("job/%s ended earlier (%s); replacing it", name, _ended(job)["type"])
                kubectl("delete", "job", name, "--ignore-not-found", "--cascade=foreground", "--wait=true")
            _apply(kubectl, docs, name, cmd)
            log.info("job/%s: %d worker pod(s) in namespace %s", name, spec.compute.workers, ns)
    except KubectlError as e:
        log.error("kubectl: %s", e)
        return EXIT_FAILED
    if not wait:
        log.info("pods: %s get pods -l app.kubernetes.io/instance=%s; logs: %s logs -l app.kubernetes.io/instance=%s "
                 "--prefix", cmd, name, cmd, name)
        return EXIT_OK
    return _follow(kubectl, name, spec, Bar(total, initial, spec.name, show_progress))


def _apply(kubectl, docs, name, cmd):
    """Apply the Secret and the Job; then delete the job's other Secrets (earlier job files)."""
    secret = docs[0]["metadata"]["name"]
    try:
        # server-side: client-side apply would copy the job file into an annotation, which has a 256 KiB limit
        kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=batchllm", "-f", "-",
                stdin=_stream(docs))
    except KubectlError as e:
        if "field is immutable" in e.stderr:  # a Job of this name runs with another pod template: another job file
            raise SpecError(f"job/{name} is running with a different job file; wait for it to end, or stop it with "
                            f"`{cmd} delete job {name}`, then submit again") from None
        raise
    # the Job now mounts `secret`: the others are left from earlier job files (a Job deleted by its TTL, a resubmit)
    try:
        kubectl("delete", "secret", "-l", f"app.kubernetes.io/instance={name}", "--field-selector",
                f"metadata.name!={secret}", "--ignore-not-found")
    except KubectlError as e:
        log.warning("kubectl: %s (deleting the job's earlier Secrets; `%s delete secret -l "
                    "app.kubernetes.io/instance=%s` removes them all once the job is done)", e, cmd, name)


def _follow(kubectl, name, spec, bar) -> int:
    """Poll the Job until it ends. SIGINT/SIGTERM, or losing the API server for MAX_MISSES polls, stop the
    following only (75): the Job runs on, and a resubmit follows it again."""
    cmd = kubectl_text(spec.compute.kubernetes)
    store = Store(spec.output.uri, spec.storage)
    plan = store.read_json(PLAN)
    stop = threading.Event()
    try:
        with on_stop(lambda signum: stop.set()):
            return _poll(kubectl, name, bar, store, plan, stop, cmd)
    finally:
        bar.close()


def _poll(kubectl, name, bar, store, plan, stop, cmd) -> int:
    """_follow's loop: an exit code once the Job ended, vanished, could not be read, or `stop` was set."""
    misses = 0
    while not stop.is_set():
        try:
            job = kubectl.job(name)
        except KubectlError as e:
            misses += 1
            if misses == MAX_MISSES:
                log.error("kubectl: %s; lost contact with the cluster, so stopped following; job/%s may still "
                          "be running: submit again to follow it (or `%s get job %s`)", e, name, cmd, name)
                return EXIT_RETRY
            log.warning("kubectl: %s (trying again)", e)
        else:
            misses = 0
            if plan is not None:
                _progress(store, plan, bar)
            if job is None:
                log.error("job/%s is gone (deleted?); submit again to resume", name)
                return EXIT_RETRY
            end = _ended(job)
            if end is not None and end["type"] == "Complete":
                return EXIT_OK
            if end is not None:
                log.error("job/%s failed: %s: %s (logs: %s logs -l app.kubernetes.io/instance=%s --prefix)",
                          name, end.get("reason"), end.get("message"), cmd, name)
                return EXIT_FAILED
        stop.wait(POLL_S)
    log.warning("stopped following; job/%s keeps running (`%s delete job %s` stops it; "
                "submit again to follow it)", name, cmd, name)
    return EXIT_RETRY


def _progress(store, plan, bar):
    """Move the bar to the rows the checkpoints hold."""
    try:
        done = summarize(plan, load_all(store, plan))["rows_done"]
    except Exception:  # noqa: BLE001 (the bar is cosmetic: a storage hiccup skips one update, the Job decides)
        log.debug("reading progress failed", exc_info=True)
        return
    if done > bar.n:
        bar.update(done - bar.n)
