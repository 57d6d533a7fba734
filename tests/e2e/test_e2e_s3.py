"""End to end on moto's S3 server through s3fs, with metrics pushed to a real Pushgateway.

Parquet (several files, several row groups) in, Parquet results out; the same job from JSONL; and an
OpenAI batch file in, OpenAI batch output lines out.
"""
from runner_helpers import (by_id, cli, jsonl_bytes, job_doc, openai_rows, parquet_bytes, read_jsonl_dir,
                            read_table, review_rows, scrape, write_job)

RESULT_COLUMNS = {"id", "text", "stars", "output", "finish_reason", "prompt_tokens", "completion_tokens"}


def _opts(endpoint):
    return {"client_kwargs": {"endpoint_url": endpoint}}


def _metric(samples, name, **labels):
    want = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and want <= ls]


def test_parquet_on_s3_with_pushgateway(tiny_model_dir, s3fs_, s3_endpoint, pushgateway, tmp_path):
    bucket = "parquet-e2e"
    s3fs_.mkdir(bucket)
    rows = review_rows(30)
    for i, part in enumerate([rows[:12], rows[12:22], rows[22:]]):  # 3 files, row groups of 4
        s3fs_.pipe(f"{bucket}/reviews/part-{i}.parquet", parquet_bytes(part, row_group_size=4))
    s3fs_.pipe(f"{bucket}/reviews/_SUCCESS", b"")  # not a data file: ignored
    doc = job_doc(tiny_model_dir, f"s3://{bucket}/reviews/", f"s3://{bucket}/labels", name="s3-parquet",
                  input={"id_column": "review_id"}, output={"columns": ["text", "stars"], "rows_per_part": 5},
                  compute={"rows_per_shard": 10}, storage={"endpoint_url": s3_endpoint},
                  metrics={"pushgateway": pushgateway, "interval_s": 1}, cost={"gpu_hour_usd": 2.5},
                  engine={"max_num_seqs": 16})
    job = write_job(tmp_path / "job.yaml", doc)

    r = cli("plan", job)
    assert r.exit_code == 0, r.output
    assert "3 parquet file(s), 30 rows, 3 shard(s)" in r.output

    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert "state      complete" in r.output

    results = read_table(f"s3://{bucket}/labels/results", storage_options=_opts(s3_endpoint))
    assert sorted(x["id"] for x in results) == [x["review_id"] for x in rows]  # each row exactly once
    assert set(results[0]) == RESULT_COLUMNS
    src = by_id(rows, "review_id")
    for x in results:
        assert x["text"] == src[x["id"]]["text"] and x["stars"] == src[x["id"]]["stars"]
        assert x["finish_reason"] in ("stop", "length") and 1 <= x["completion_tokens"] <= 6
        assert x["prompt_tokens"] > 10
    names = s3fs_.ls(f"{bucket}/labels/results", refresh=True)
    assert names and all(n.endswith(".parquet") for n in names)  # data files only
    assert not s3fs_.exists(f"{bucket}/labels/errors")
    assert s3fs_.exists(f"{bucket}/labels/_batchllm/manifest.json")

    # metrics: one group per shard, final values pushed at exit
    samples = scrape(pushgateway)
    ok = _metric(samples, "batchllm_rows_total", job="s3-parquet", status="ok")
    assert sorted(ok) == [8.0, 10.0, 12.0]
    gen = sum(_metric(samples, "batchllm_generation_tokens_total", job="s3-parquet"))
    assert gen == sum(x["completion_tokens"] for x in results)
    prompt = sum(_metric(samples, "batchllm_prompt_tokens_total", job="s3-parquet"))
    assert prompt == sum(x["prompt_tokens"] for x in results)
    for shard in ("0", "1", "2"):
        assert _metric(samples, "batchllm_shard_complete", job="s3-parquet", shard=shard) == [1.0]
        assert _metric(samples, "batchllm_shard_progress_ratio", job="s3-parquet", shard=shard) == [1.0]
        assert _metric(samples, "batchllm_worker_exit_code", job="s3-parquet", shard=shard) == [0.0]
        assert _metric(samples, "batchllm_estimated_cost_usd", job="s3-parquet", shard=shard)[0] > 0
        assert len(_metric(samples, "batchllm_kv_cache_usage_ratio", job="s3-parquet", shard=shard)) == 1
        assert len(_metric(samples, "batchllm_prefix_cache_hit_ratio", job="s3-parquet", shard=shard)) == 1
        assert len(_metric(samples, "batchllm_preemptions_total", job="s3-parquet", shard=shard)) == 1
    assert _metric(samples, "batchllm_generation_tokens_per_second", job="s3-parquet", shard="0")[0] > 0

    r = cli("status", job)
    assert r.exit_code == 0 and "30/30 rows" in r.output and "est. cost" in r.output
    r = cli("status", f"s3://{bucket}/labels", env={"AWS_ENDPOINT_URL": s3_endpoint})  # no spec: env endpoint
    assert r.exit_code == 0 and "state      complete" in r.output

    r = cli("submit", job, "--no-progress")  # finished: nothing to do
    assert r.exit_code == 0 and "nothing to do" in r.output


def test_jsonl_on_s3(tiny_model_dir, s3fs_, s3_endpoint, tmp_path):
    bucket = "jsonl-e2e"
    s3fs_.mkdir(bucket)
    rows = review_rows(25)
    s3fs_.pipe(f"{bucket}/in/reviews.jsonl", jsonl_bytes(rows))
    doc = job_doc(tiny_model_dir, f"s3://{bucket}/in/reviews.jsonl", f"s3://{bucket}/out", name="s3-jsonl",
                  output={"columns": ["text", "stars"]}, compute={"rows_per_shard": 10},
                  storage={"endpoint_url": s3_endpoint}, engine={"max_num_seqs": 16})
    job = write_job(tmp_path / "job.yaml", doc)
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    results = read_table(f"s3://{bucket}/out/results", storage_options=_opts(s3_endpoint))
    assert sorted(x["id"] for x in results) == list(range(25))  # default id: the row's position
    src = dict(enumerate(rows))
    assert all(x["text"] == src[x["id"]]["text"] and x["stars"] == src[x["id"]]["stars"] for x in results)
    assert set(results[0]) == RESULT_COLUMNS


def test_openai_batch_on_s3(tiny_model_dir, s3fs_, s3_endpoint, tmp_path):
    bucket = "openai-e2e"
    s3fs_.mkdir(bucket)
    rows = review_rows(14)
    lines = openai_rows(rows[:8], max_tokens=5) + openai_rows(rows[8:], url="/v1/completions", max_tokens=2,
                                                              temperature=0)
    lines[0]["body"]["max_tokens"] = 1  # per-row parameters are honoured
    s3fs_.pipe(f"{bucket}/batch/requests.jsonl", jsonl_bytes(lines))
    doc = job_doc(tiny_model_dir, f"s3://{bucket}/batch/requests.jsonl", f"s3://{bucket}/batch-out",
                  name="s3-openai", prompt=None, output={"columns": []}, compute={"rows_per_shard": 6},
                  storage={"endpoint_url": s3_endpoint}, engine={"max_num_seqs": 16})
    job = write_job(tmp_path / "job.yaml", doc)
    r = cli("submit", job, "--no-progress")
    assert r.exit_code == 0, r.output + r.stderr
    out = read_jsonl_dir(f"s3://{bucket}/batch-out/results", storage_options=_opts(s3_endpoint))
    got = by_id(out, "custom_id")
    assert sorted(got) == sorted(r["review_id"] for r in rows)
    assert len(out) == len(rows)
    for line in out:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        resp = line["response"]
        assert resp["status_code"] == 200 and resp["request_id"]
        usage = resp["body"]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert got[rows[0]["review_id"]]["response"]["body"]["usage"]["completion_tokens"] == 1
    assert "content" in got[rows[1]["review_id"]]["response"]["body"]["choices"][0]["message"]
    for r_ in rows[8:]:
        body = got[r_["review_id"]]["response"]["body"]
        assert body["object"] == "text_completion" and "text" in body["choices"][0]
        assert body["usage"]["completion_tokens"] <= 2
    # pyarrow.dataset reads the output lines too
    assert len(read_table(f"s3://{bucket}/batch-out/results", fmt="json", storage_options=_opts(s3_endpoint))) == 14
