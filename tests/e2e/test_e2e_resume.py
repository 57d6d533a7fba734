"""Kill and resume: SIGKILL mid-shard then rerun, SIGTERM with a grace period, both compared with an
uninterrupted run of the same job (greedy, so results must be equal row for row)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from runner_helpers import (by_id, cli, jsonl_bytes, job_doc, local_results, read_table, review_rows,
                            write_job)

ROWS = 24
# one sequence at a time, 48 tokens each, and small parts: the shard takes ~1,000 steps (seconds, where 8
# tokens at 4 sequences took ~0.1 s and a signal could land after the last row) and commits often, so a kill
# lands mid-shard and a SIGTERM finds rows still to admit.
SECTIONS = dict(name="resume", output={"columns": ["text"], "rows_per_part": 3},
                engine={"max_num_seqs": 1}, compute={"rows_per_shard": 15, "grace_period_s": 10},
                sampling={"max_tokens": 48, "temperature": 0.0, "ignore_eos": True})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume-data") / "reviews.jsonl"
    path.write_bytes(jsonl_bytes(review_rows(ROWS)))
    return path


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, dataset, tmp_path_factory):
    """Results of the uninterrupted run, by id."""
    rows = local_results(tiny_model_dir, dataset, tmp_path_factory.mktemp("baseline"), **SECTIONS)
    assert len(rows) == ROWS
    return by_id(rows)


def _committed(out_dir):
    total = 0
    ck_dir = out_dir / "_batchllm" / "checkpoints"
    if not ck_dir.exists():
        return 0
    for p in ck_dir.glob("shard-*.json"):
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            continue
        total += sum(b - a for part in doc["parts"] for a, b in part["rows"])
    return total


def _start_worker(job, log):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "batchllm.cli", "worker", job], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def _wait_for_commits(proc, out_dir, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _committed(out_dir) >= at_least:
            return
        assert proc.poll() is None, "the worker ended before the test could interrupt it"
        time.sleep(0.05)
    raise AssertionError("the worker committed nothing in time")


def _check_against(baseline, out_dir):
    results = read_table(str(out_dir / "results"))
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == ROWS, "every row exactly once"
    assert not (out_dir / "errors").exists() or not read_table(str(out_dir / "errors"))
    for r in results:
        b = baseline[r["id"]]
        assert (r["output"], r["finish_reason"], r["completion_tokens"], r["prompt_tokens"]) == (
            b["output"], b["finish_reason"], b["completion_tokens"], b["prompt_tokens"]), r["id"]


def test_sigkill_mid_shard_then_resume(tiny_model_dir, dataset, baseline, tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, dataset, out, **SECTIONS))
    with open(tmp_path / "worker.log", "w") as log:
        proc = _start_worker(job, log)
        try:
            _wait_for_commits(proc, out, at_least=6)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = _committed(out)
    assert 6 <= done_before < ROWS
    # no temporary or partial file under results/
    assert all(p.suffix == ".parquet" for p in (out / "results").iterdir())

    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"resuming; {done_before}/{ROWS}" in r.stderr
    _check_against(baseline, out)
    r = cli("status", str(out))
    assert r.exit_code == 0 and f"{ROWS}/{ROWS} rows" in r.output


def test_sigterm_commits_and_exits_75_within_grace(tiny_model_dir, dataset, baseline, tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, dataset, out, **SECTIONS))
    with open(tmp_path / "worker.log", "w") as log:
        proc = _start_worker(job, log)
        try:
            _wait_for_commits(proc, out, at_least=3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    logtext = (tmp_path / "worker.log").read_text()
    assert rc == 75, logtext
    assert took < SECTIONS["compute"]["grace_period_s"], took
    done = _committed(out)
    assert 3 <= done < ROWS
    results = read_table(str(out / "results"))
    assert len(results) == done  # the finished rows are committed, nothing more
    r = cli("status", str(out))
    assert r.exit_code == 75 and "running" in r.output

    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    _check_against(baseline, out)


def test_grace_period_expiry_abandons_unfinished_rows(tiny_model_dir, tmp_path):
    """Rows still generating when the grace period ends are left for the next run; finished ones commit."""
    from batchllm.runner.spec import load_spec
    from batchllm.runner.worker import run_worker

    data = tmp_path / "reviews.jsonl"
    # two rows without text (errors, finished at once) after rows that will still be generating
    rows = review_rows(4) + [{"review_id": "bad0"}, {"review_id": "bad1"}] + review_rows(4, start=4)
    data.write_bytes(jsonl_bytes(rows))
    out = tmp_path / "out"
    # long generations (3000 tokens: 3000 engine steps, over 1 ms each) cannot finish within the 0.5 s grace
    # period, even on an idle machine
    sections = dict(SECTIONS, sampling={"max_tokens": 3000, "ignore_eos": True, "temperature": 0.0},
                    compute={"rows_per_shard": 100, "grace_period_s": 0.5},
                    model={"max_model_len": 3200}, engine={"max_num_seqs": 4, "num_kv_blocks": 820})
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, **sections))
    spec = load_spec(job)
    fired = {}

    def progress(n):  # SIGTERM this process once the bad rows are finished (the worker handles it)
        fired["n"] = fired.get("n", 0) + n
        if fired["n"] >= 2 and "t" not in fired:
            fired["t"] = time.monotonic()
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()

    code = run_worker(spec, progress=progress)
    took = time.monotonic() - fired["t"]
    assert code == 75
    assert 0.2 < took < 0.5 + 1.0, took  # waited for the generating rows, then gave up within grace
    errors = read_table(str(out / "errors"))
    assert sorted(e["row"] for e in errors) == [4, 5] and _committed(out) == 2
    assert read_table(str(out / "results")) == []  # nothing was finished in time; nothing half-written
