"""Helpers for the runner tests: small review datasets, job files, result readers, service processes."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

WORDS = ["great", "terrible", "fine", "broke", "love", "slow", "sturdy", "cheap", "perfect", "noisy"]
ITEMS = ["kettle", "headphones", "backpack", "lamp", "charger", "mug", "tent", "blender"]

# Small engine settings: the tiny model on the CPU with a small KV pool.
ENGINE = {"device": "cpu", "num_kv_blocks": 128, "max_num_seqs": 4}


def review_rows(n, start=0):
    """n deterministic short reviews with review_id, text and stars."""
    rows = []
    for i in range(start, start + n):
        w1, w2 = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        item = ITEMS[(i * 3) % len(ITEMS)]
        rows.append({"review_id": f"r{i:04d}", "text": f"The {item} is {w1}, {w2} overall.", "stars": i % 5 + 1})
    return rows


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet_bytes(rows, row_group_size) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def openai_rows(rows, url="/v1/chat/completions", **body):
    out = []
    for r in rows:
        if url == "/v1/chat/completions":
            b = {"model": "tiny", "messages": [{"role": "system", "content": "Label the sentiment."},
                                                {"role": "user", "content": r["text"]}]}
        else:
            b = {"model": "tiny", "prompt": f"Review: {r['text']}\nSentiment:"}
        b.update(body)
        out.append({"custom_id": r["review_id"], "method": "POST", "url": url, "body": b})
    return out


def job_doc(model_dir, input_uri, output_uri, **sections):
    doc = {
        "name": "test-job",
        "model": {"source": str(model_dir), "max_model_len": 256},
        "input": {"uri": str(input_uri)},
        "prompt": {"system": "You label the sentiment of product reviews.",
                   "template": "Review: {text}\nAnswer with one word."},
        "sampling": {"max_tokens": 6, "temperature": 0.0},
        "output": {"uri": str(output_uri), "columns": ["text"], "rows_per_part": 8},
        "engine": dict(ENGINE),
        "compute": {"rows_per_shard": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        elif value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def write_job(path, doc) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return str(path)


def local_results(model_dir, data, work_dir, **sections):
    """Run a job over `data` on the local backend to completion in `work_dir`; its result rows (the baseline that
    interrupted or distributed runs of the same job are compared with)."""
    job = write_job(work_dir / "job.yaml", job_doc(model_dir, data, work_dir / "out", **sections))
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    return read_table(str(work_dir / "out" / "results"))


def cli(*args, env=None):
    """Run `batchllm ARGS` in this process; returns the click Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from batchllm.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def read_table(uri, fmt="parquet", storage_options=None):
    """Rows of OUTPUT/results (or errors) through pyarrow.dataset, as a list of dicts."""
    import fsspec
    import pyarrow.dataset as ds

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        return []
    return ds.dataset(path, filesystem=fs, format=fmt).to_table().to_pylist()


def read_jsonl_dir(uri, storage_options=None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        return []
    out = []
    for p in sorted(fs.find(path)):
        out += [json.loads(line) for line in fs.cat_file(p).decode().splitlines() if line.strip()]
    return out


def by_id(rows, key="id"):
    return {r[key]: r for r in rows}


# ---- services (moto S3 and the Pushgateway), started by session fixtures ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_service(what: str, how: str):
    """Skip loudly outside CI; fail under CI (a missing service there is a broken setup)."""
    msg = f"{what} is not available: {how} (run .ci/services.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {msg}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {msg}")


def _wait_http(url, proc, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {timeout}s")


def start_moto():
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        missing_service("moto's S3 server", f"{e}; pip install 'moto[server]' s3fs")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, "moto server")
    return proc, f"http://127.0.0.1:{port}"


def start_pushgateway():
    binary = shutil.which("prometheus-pushgateway") or (
        "/usr/bin/prometheus-pushgateway" if os.path.exists("/usr/bin/prometheus-pushgateway") else None)
    if binary is None:
        missing_service("prometheus-pushgateway", "apt-get install -y prometheus-pushgateway")
    port = free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/-/ready", proc, "pushgateway")
    return proc, f"http://127.0.0.1:{port}"


# Ray binds every interface unless it runs in its single-host mode (the flag that mode is named after on macOS
# and Windows); in it, the head, its workers and every driver stay on 127.0.0.1. Token auth off: an earlier
# local ray.init() leaves a token in ~/.ray that would otherwise switch it on.
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def start_ray(num_cpus=4):
    """A one-node Ray cluster (`ray start --head --block`); returns (process, address, env for its drivers)."""
    import tempfile

    try:
        import ray  # noqa: F401
    except ImportError as e:
        missing_service("a Ray cluster", f"{e}; pip install ray")
    port = free_port()
    env = dict(os.environ, **RAY_LOCAL_ENV)
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode} before it was ready")
        status = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={address}"],
                                env=env, capture_output=True, text=True)
        if status.returncode == 0 and "CPU" in status.stdout:
            return proc, address, env
        time.sleep(0.5)
    raise RuntimeError(f"the Ray cluster at {address} was not ready after 60 s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def scrape(url):
    """{(metric sample name, frozenset(labels)): value} from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out
