"""A stand-in kubectl for the kubernetes backend's tests (tests/runner and tests/e2e): a script first on PATH that
records each call and answers from a state file. Not a test module: the tests import FakeKubectl, job_state and
the `kubectl` fixture (kubectl_fixture) from here.
"""
import json
import os
import sys

import pytest
import yaml

VERBS = ("get", "apply", "delete")

FAKE_KUBECTL = r'''#!{python}
"""A stand-in kubectl: records each call and answers from state.json (see FakeKubectl)."""
import json, os, signal, sys

here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
at = next(i for i, a in enumerate(args) if a in ("get", "apply", "delete"))
verb = args[at]
what = verb if verb == "apply" else f"{verb} {args[at + 1]}"  # "get job", "apply", "delete secret", ...
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


if what in state.get("errors", {}):
    sys.stderr.write(state["errors"][what] + "\n")
    sys.exit(1)
if what == "get job":
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
elif what == "delete job":
    state["jobs"] = []
    save()
elif verb == "apply":
    state.update(state.pop("on_apply", {"jobs": [{"status": {"active": 1}}]}))
    save()
'''


class FakeKubectl:
    """`kubectl` first on PATH. state.json: `jobs`, the Job's states that successive `get job`s return (the last
    one stays; [] is no Job); `on_apply`, state that apply sets (default: a running Job); `errors`, {"get job" |
    "apply" | "delete job" | "delete secret": stderr} for calls that fail; `interrupt_on_get`, the nth `get` sends
    SIGINT to the process that ran it."""

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
        """Each call as "get job", "apply", "delete job", "delete secret", ..."""
        out = []
        for c in self.calls():
            at = next(i for i, a in enumerate(c["argv"]) if a in VERBS)
            out.append(c["argv"][at] if c["argv"][at] == "apply" else " ".join(c["argv"][at:at + 2]))
        return out

    def applied(self) -> list[dict]:
        """The manifests of the last apply."""
        return list(yaml.safe_load_all([c for c in self.calls() if "apply" in c["argv"]][-1]["stdin"]))


def job_state(kind="active", reason=None, message=None, secret=None) -> dict:
    """A Job as `kubectl get job -o json` shows it: "active" (running), "Complete" or "Failed" (ended), or
    "FailureTarget" (failing: its pods are still stopping); `secret`: the Secret its pods mount the job file from."""
    job = {"kind": "Job", "status": {"active": 2, "ready": 2}}
    if kind != "active":
        conditions = [{"type": kind, "status": "True", "reason": reason or kind, "message": message or ""}]
        if kind == "Failed":
            conditions.insert(0, dict(conditions[0], type="FailureTarget"))
        job["status"] = {"conditions": conditions}
    if secret:
        job["spec"] = {"template": {"spec": {"volumes": [{"name": "job", "secret": {"secretName": secret}}]}}}
    return job


@pytest.fixture(name="kubectl")
def kubectl_fixture(tmp_path, monkeypatch):
    """`kubectl`: the stand-in kubectl, first on PATH for the test (import kubectl_fixture to use it)."""
    fake = FakeKubectl(tmp_path / "fake-bin")
    monkeypatch.setenv("PATH", f"{fake.folder}{os.pathsep}{os.environ['PATH']}")
    return fake
