"""Jobs through the real engine on the tiny model, on local files: bad rows, error policy, output formats,
several local workers."""
import json
import subprocess

_POPEN = subprocess.Popen  # the real one, for the stand-ins below

from runner_helpers import (by_id, cli, free_port, jsonl_bytes, job_doc, openai_rows, parquet_bytes, read_jsonl_dir,
                            read_table, review_rows, write_job)


def _bad_jsonl(path):
    good = review_rows(16)
    lines = [json.dumps(r) for r in good[:8]]
    lines.append('{"review_id": "broken", "text": ')  # malformed JSON
    lines.append("[1, 2, 3]")  # not an object
    lines.append(json.dumps({"review_id": "no-text", "stars": 3}))  # missing column
    lines.append(json.dumps({"review_id": "too-long", "text": "very long review " * 120}))  # > max_model_len
    lines += [json.dumps(r) for r in good[8:]]
    path.write_text("\n".join(lines) + "\n")
    return good


def test_bad_rows_end_in_errors_and_the_policy_sets_the_exit_code(tiny_model_dir, tmp_path):
    data = tmp_path / "reviews.jsonl"
    good = _bad_jsonl(data)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, input={"id_column": "review_id"},
                                                   engine={"max_num_seqs": 16}))
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 1, r.output + r.stderr  # 4 errors in 20 rows: 0.2 > max_error_ratio 0.1
    assert "state      failed" in r.output

    results = read_table(str(out / "results"))
    errors = read_table(str(out / "errors"))
    assert sorted(x["id"] for x in results) == sorted(g["review_id"] for g in good)
    got = {(e["row"], e["id"], e["error_type"]) for e in errors}
    assert got == {(8, None, "malformed_json"), (9, None, "malformed_json"),
                   (10, "no-text", "missing_column"), (11, "too-long", "prompt_too_long")}
    assert all(e["message"] for e in errors)
    too_long = next(e for e in errors if e["id"] == "too-long")
    assert "max_model_len" in too_long["message"]
    assert len(results) + len(errors) == 20  # every input row in exactly one of the two

    r = cli("status", str(out))
    assert r.exit_code == 1 and "16 ok, 4 errors" in r.output
    # a looser policy: the same finished job now counts as complete, and nothing is rerun
    r = cli("submit", job, "--no-progress", "--set", "max_error_ratio=0.25")
    assert r.exit_code == 0 and "already complete" in r.output and "nothing to do" in r.output


def test_openai_batch_bad_rows(tiny_model_dir, tmp_path):
    rows = review_rows(6)
    lines = [json.dumps(x) for x in openai_rows(rows, max_tokens=3)]
    bad = openai_rows(review_rows(4, start=100))
    bad[0]["body"]["temperature"] = -1
    bad[1]["url"] = "/v1/embeddings"
    del bad[2]["body"]["messages"]
    bad[3]["body"]["messages"][1]["content"] = "very long review " * 120
    lines += [json.dumps(x) for x in bad] + ['{"custom_id": "cut-off", "body": {']
    data = tmp_path / "batch.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, prompt=None, output={"columns": []},
                                                   max_error_ratio=0.5, engine={"max_num_seqs": 16}))
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    results = read_jsonl_dir(str(out / "results"))
    errors = read_jsonl_dir(str(out / "errors"))
    assert sorted(x["custom_id"] for x in results) == [x["review_id"] for x in rows]
    codes = {e["custom_id"]: e["error"]["code"] for e in errors}
    assert codes == {"r0100": "invalid_params", "r0101": "invalid_request", "r0102": "missing_column",
                     "r0103": "prompt_too_long", None: "malformed_json"}
    assert all(e["response"] is None and e["error"]["message"] for e in errors)
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 3 for x in results)
    assert all(x["id"].startswith("batch_req_") for x in results + errors)


def test_parquet_to_jsonl_with_raw_and_messages_prompts(tiny_model_dir, tmp_path):
    rows = review_rows(10)
    for r in rows:
        r["conv"] = [{"role": "user", "content": r["text"]}]
    (tmp_path / "in.parquet").write_bytes(parquet_bytes(rows, row_group_size=3))
    for name, prompt in (("raw", {"column": "text", "chat": False, "system": "Label:"}),
                         ("msgs", {"messages_column": "conv", "system": "Label the review."})):
        out = tmp_path / name
        doc = job_doc(tiny_model_dir, tmp_path / "in.parquet", out, prompt=prompt, name=name,
                      output={"format": "jsonl", "columns": ["stars"]}, engine={"max_num_seqs": 16})
        doc["prompt"] = prompt  # replace, not merge
        r = cli("submit", write_job(tmp_path / f"{name}.yaml", doc), "--no-progress")
        assert r.exit_code == 0, r.output + r.stderr
        got = read_jsonl_dir(str(out / "results"))
        assert sorted(x["id"] for x in got) == list(range(10))
        assert {x["id"]: x["stars"] for x in got} == {i: r["stars"] for i, r in enumerate(rows)}
        assert set(got[0]) == {"id", "stars", "output", "finish_reason", "prompt_tokens", "completion_tokens"}


def test_two_local_workers(tiny_model_dir, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(16)))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, compute={"rows_per_shard": 4,
                                                                                     "workers": 2}))
    r = cli("plan", job)
    assert r.exit_code == 0 and "4 shard(s)" in r.output
    lines = [line.split() for line in r.output.splitlines() if line[:1].isdigit()]
    assert [(s[0], s[1]) for s in lines] == [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]  # shard, worker
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    results = read_table(str(out / "results"))
    assert sorted(x["id"] for x in results) == list(range(16))
    manifest = json.loads((out / "_batchllm" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_ok"] == 16


def test_lanes_share_gpus_one_worker_at_a_time():
    from batchllm.runner.backends.local import lanes

    assert lanes(5, ["0", "1"]) == [[0, 2, 4], [1, 3]]
    assert lanes(2, ["0", "1", "2"]) == [[0], [1]]
    assert lanes(3, []) == [[0], [1], [2]]  # CPU workers all run at once


class _Recorded:
    """Stands in for subprocess.Popen in the local backend: records when each worker starts and ends."""

    events: list = []
    on_start = None

    def __init__(self, cmd, **kw):
        import time

        self.index = int(cmd[cmd.index("--index") + 1])
        self.proc = _POPEN(cmd, **kw)
        self.stdout = self.proc.stdout
        _Recorded.events.append(("start", self.index, time.monotonic()))
        if _Recorded.on_start:
            _Recorded.on_start(self)

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self):
        import time

        code = self.proc.wait()
        _Recorded.events.append(("end", self.index, time.monotonic()))
        return code


def _two_workers_one_gpu(tiny_model_dir, tmp_path, monkeypatch, rows):
    from batchllm.runner.backends import local

    monkeypatch.setattr(local, "_gpu_ids", lambda spec: ["0"])  # one card (the workers still run on the CPU)
    monkeypatch.setattr(local.subprocess, "Popen", _Recorded)
    _Recorded.events, _Recorded.on_start = [], None
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(rows)))
    out = tmp_path / "out"
    return write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, compute={"rows_per_shard": 4,
                                                                                       "workers": 2})), out


def test_workers_sharing_a_gpu_run_one_after_another(tiny_model_dir, tmp_path, monkeypatch):
    job, out = _two_workers_one_gpu(tiny_model_dir, tmp_path, monkeypatch, rows=12)
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert [(e[0], e[1]) for e in _Recorded.events] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert sorted(x["id"] for x in read_table(str(out / "results"))) == list(range(12))


def test_a_stop_leaves_the_workers_not_yet_started(tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM while a GPU's first worker runs: it commits and exits 75, its lane starts nobody else, the job
    exits 75, and the next submit finishes every row."""
    import os
    import signal
    import threading

    job, out = _two_workers_one_gpu(tiny_model_dir, tmp_path, monkeypatch, rows=40)
    _Recorded.on_start = lambda w: threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 75, r.output + r.stderr
    assert [e[:2] for e in _Recorded.events] == [("start", 0), ("end", 0)]
    _Recorded.on_start = None
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(x["id"] for x in read_table(str(out / "results"))) == list(range(40))


def test_detached_workers_sharing_a_gpu_are_chained(tiny_model_dir, tmp_path, monkeypatch):
    import time

    from batchllm.runner.backends import local

    job, out = _two_workers_one_gpu(tiny_model_dir, tmp_path, monkeypatch, rows=12)
    started = []

    class Spy(_POPEN):
        def __init__(self, cmd, **kw):
            started.append(cmd)
            super().__init__(cmd, **kw)

    monkeypatch.setattr(local.subprocess, "Popen", Spy)
    r = cli("submit", job, "--no-wait", "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert len(started) == 1 and started[0][:2] == ["/bin/sh", "-c"]  # one lane: both workers, in turn
    assert "--index 0" in started[0][2] and "; " in started[0][2] and "--index 1" in started[0][2]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        results = (out / "results").is_dir() and read_table(str(out / "results"))
        if results and len(results) == 12:
            break
        time.sleep(1)
    assert sorted(x["id"] for x in read_table(str(out / "results"))) == list(range(12))


def test_spec_errors_found_at_plan_time(tiny_model_dir, tmp_path):
    (tmp_path / "in.parquet").write_bytes(parquet_bytes(review_rows(4), row_group_size=2))
    doc = job_doc(tiny_model_dir, tmp_path / "in.parquet", tmp_path / "out", input={"id_column": "sku"})
    r = cli("submit", write_job(tmp_path / "job.yaml", doc), "--no-progress")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: input.id_column: column 'sku' is not in the dataset; "
                                "columns are: review_id, text, stars")
    r = cli("status", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "no job there" in r.stderr


def test_a_model_that_cannot_be_fetched_now_is_a_retry_not_a_spec_error(tmp_path):
    """Storage that does not answer is the network's fault, not the job file's: exit 75 (Ray and Kubernetes retry
    the worker), with one error line; nothing is written but the plan."""
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(3)))
    doc = job_doc("s3://models/tiny", data, tmp_path / "out",
                  storage={"endpoint_url": f"http://127.0.0.1:{free_port()}", "options": {"anon": True}})
    r = cli("worker", write_job(tmp_path / "job.yaml", doc))
    assert r.exit_code == 75, r.stderr
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "model.source: could not read s3://models/tiny" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "results").exists()


def test_changed_spec_on_same_output_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(3)))
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, tmp_path / "out"))
    assert cli("submit", job, "--no-progress").exit_code == 0
    r = cli("submit", job, "--no-progress", "--set", "sampling.max_tokens=2")
    assert r.exit_code == 2 and "already holds job 'test-job' made from a different spec" in r.stderr
    by = by_id(read_table(str(tmp_path / "out" / "results")))
    assert sorted(by) == [0, 1, 2]


def test_rows_stream_with_bounded_memory(tiny_model_dir, tmp_path, monkeypatch):
    """The worker holds only the rows the engine has pulled, and at most one part of finished rows."""
    from batchllm.runner import worker

    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(200)))
    seen = {"pending": 0, "buffered": 0}
    real = worker._ShardRun.finished

    def spy(self, out):
        seen["pending"] = max(seen["pending"], len(self.pending))
        seen["buffered"] = max(seen["buffered"], self.writer.num_pending)
        return real(self, out)

    monkeypatch.setattr(worker._ShardRun, "finished", spy)
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, tmp_path / "out",
                                                   sampling={"max_tokens": 1}, compute={"rows_per_shard": 1000},
                                                   output={"rows_per_part": 16}))
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert len(read_table(str(tmp_path / "out" / "results"))) == 200
    assert seen["pending"] <= 3 * 4 + 1  # max_num_seqs 4: 2x waiting + running (+ the one being handed over)
    assert seen["buffered"] < 16


def test_crash_between_part_and_checkpoint_leaves_no_duplicates(tiny_model_dir, tmp_path, monkeypatch):
    """A part file written but never recorded (the worker died in between) is removed on the rerun."""
    import pytest

    from batchllm.runner import checkpoint
    from batchllm.runner.spec import load_spec
    from batchllm.runner.worker import run_worker

    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(20)))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_doc(tiny_model_dir, data, out, output={"rows_per_part": 4},
                                                   compute={"rows_per_shard": 100}))
    real = checkpoint.ShardCheckpoint.add_part
    calls = []

    def crash_on_second(self, part, complete=False):
        calls.append(part["seq"])
        if len(calls) == 2:
            raise RuntimeError("simulated crash after the data file, before the checkpoint")
        return real(self, part, complete)

    monkeypatch.setattr(checkpoint.ShardCheckpoint, "add_part", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_worker(load_spec(job))
    monkeypatch.setattr(checkpoint.ShardCheckpoint, "add_part", real)
    files = sorted(p.name for p in (out / "results").iterdir())
    assert files == ["part-00000-00000.parquet", "part-00000-00001.parquet"]  # the second is an orphan
    assert len(read_table(str(out / "results"))) > 4  # visible while the job is unfinished

    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    ids = [x["id"] for x in read_table(str(out / "results"))]
    assert sorted(ids) == list(range(20))  # exactly once


def test_fp8_settings_reach_the_engine(tiny_model_dir, tmp_path):
    """model.quantization and engine.kv_cache_dtype are carried out, not just accepted: the worker's engine has fp8
    weights and an fp8 KV cache, and the job completes with them."""
    import torch

    from batchllm.layers.linear import MergedLinear
    from batchllm.runner.spec import spec_from_dict
    from batchllm.runner.worker import make_engine

    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(6)))
    out = tmp_path / "out"
    doc = job_doc(tiny_model_dir, data, out, model={"quantization": "fp8"}, engine={"kv_cache_dtype": "fp8"})
    llm = make_engine(spec_from_dict(doc))
    assert llm.runner.kv_dtype == torch.float8_e4m3fn
    assert all(m.fp8_weight is not None for m in llm.runner.model.modules() if isinstance(m, MergedLinear))
    del llm
    r = cli("submit", write_job(tmp_path / "job.yaml", doc), "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(x["id"] for x in read_table(str(out / "results"))) == list(range(6))


def test_awq_checkpoint_runs_as_a_job(tiny_model_dir, tmp_path):
    """model.quantization awq with an AWQ checkpoint: the worker's engine reads it 4-bit and the job completes; the
    same setting with a full-precision checkpoint stops the job with one line (exit 2)."""
    from tiny_models import make_awq_pair

    awq_dir, _ = make_awq_pair(tiny_model_dir, tmp_path / "awq", tmp_path / "ref")
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(jsonl_bytes(review_rows(5)))
    out = tmp_path / "out"
    r = cli("submit", write_job(tmp_path / "job.yaml", job_doc(awq_dir, data, out, model={"quantization": "awq"})),
            "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(x["id"] for x in read_table(str(out / "results"))) == list(range(5))
    bad = job_doc(tiny_model_dir, data, tmp_path / "out2", model={"quantization": "awq"})
    r = cli("submit", write_job(tmp_path / "bad.yaml", bad), "--no-progress")
    assert r.exit_code == 2 and "quantization awq needs an AWQ checkpoint" in r.output + r.stderr, r.output + r.stderr
    assert "Traceback" not in r.output + r.stderr


def test_graph_settings_reach_the_engine(tiny_model_dir, tmp_path):
    """engine.enforce_eager and engine.piecewise_graphs are passed to the engine (they act on CUDA only)."""
    from batchllm.runner.spec import spec_from_dict
    from batchllm.runner.worker import make_engine

    doc = job_doc(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out",
                  engine={"piecewise_graphs": False, "enforce_eager": True})
    llm = make_engine(spec_from_dict(doc))
    assert llm.config.piecewise_graphs is False and llm.config.enforce_eager is True
    assert make_engine(spec_from_dict(job_doc(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out"))).config.piecewise_graphs
