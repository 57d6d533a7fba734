"""The job spec: validation, one-line errors with exit code 2, ${VAR} and --set, worker indexes."""
import pytest
import yaml

from batchllm.runner.spec import SpecError, load_spec
from batchllm.runner.worker import resolve_index
from runner_helpers import cli

BASE = {
    "name": "review-sentiment",
    "model": {"source": "smollm2-135m"},
    "input": {"uri": "data/reviews.jsonl"},
    "prompt": {"template": "Review: {text}\nAnswer with one word.", "system": "You label reviews."},
    "output": {"uri": "out/x"},
}


def _write(tmp_path, doc, name="job.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(p)


def _with(**changes):
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for path, value in changes.items():
        keys = path.split("__")
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


def _error(tmp_path, doc, *sets):
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, doc), sets)
    return str(e.value)


def test_defaults_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_write(tmp_path, BASE))
    assert spec.max_error_ratio == 0.1 and spec.metrics is None
    assert spec.compute.backend == "local" and spec.compute.workers == 1 and spec.compute.grace_period_s == 25
    assert spec.sampling.temperature == 0.0 and spec.model.quantization == "none"
    assert spec.input.uri == str(tmp_path / "data" / "reviews.jsonl")
    assert spec.output.uri == str(tmp_path / "out" / "x")


@pytest.mark.parametrize("changes, expect", [
    ({"engine__foo": 1}, "engine.foo: unknown key; valid keys here: max_num_seqs"),
    ({"bogus": 1}, "bogus: unknown key; valid keys here: name, model, input"),
    ({"model__quantization": "int4"}, "model.quantization: input should be 'none', 'fp8' or 'awq' (got 'int4')"),
    ({"engine__kv_cache_dtype": "int8"}, "engine.kv_cache_dtype: input should be 'auto' or 'fp8' (got 'int8')"),
    ({"input__format": "csv"}, "input.format: input should be 'auto', 'parquet', 'jsonl' or 'openai-batch'"),
    ({"sampling__temperature": -1}, "sampling.temperature: input should be greater than or equal to 0 (got -1)"),
    ({"sampling__max_tokens": "many"}, "sampling.max_tokens: input should be a valid integer"),
    ({"name": "Review_Sentiment"}, "name: use lowercase letters, digits and '-'"),
    ({"max_error_ratio": 2}, "max_error_ratio: input should be less than or equal to 1"),
    ({"compute__backend": "slurm"}, "compute.backend: input should be 'local', 'ray' or 'kubernetes' (got 'slurm')"),
    ({"compute__backend": "ray", "input__uri": "memory://in.jsonl"},
     "input.uri: memory:// lives in one process; the ray backend needs real storage"),
    ({"compute__backend": "kubernetes", "compute__kubernetes": {"image": "img"}},
     "input.uri: a local path, which pods cannot reach; use object storage"),
    ({"compute__backend": "kubernetes", "input__uri": "s3://b/in", "output__uri": "s3://b/out"},
     "compute.kubernetes.image: required for the kubernetes backend"),
    ({"compute__gpus_per_worker": -1}, "compute.gpus_per_worker: input should be greater than or equal to 0"),
    ({"compute__ray": {"adress": "x"}}, "compute.ray.adress: unknown key; valid keys here: address, runtime_env"),
    ({"prompt__column": "text"}, "prompt: set exactly one of template, column or messages_column"),
    ({"prompt__template": "Review: {0}"}, "prompt.template: placeholder {0} must name a column"),
    ({"prompt__template": "Review: {text"}, "prompt.template:"),
    ({"output__columns": ["output"]}, "output.columns: 'output' clashes with a result column"),
    ({"engine__block_size": 12}, "engine.block_size: input should be 8, 16, 32, 64 or 128"),
    ({"metrics": {"pushgateway": "localhost:9091"}}, "metrics.pushgateway: string should match pattern"),
    ({"input__format": "openai-batch"}, "prompt: not for openai-batch input"),
])
def test_one_line_errors_name_the_field(tmp_path, changes, expect):
    msg = _error(tmp_path, _with(**changes))
    assert expect in msg
    assert len(msg.splitlines()) == 1


def test_missing_fields_are_each_named(tmp_path):
    msg = _error(tmp_path, {"name": "x"})
    for field in ("model", "input", "output"):
        assert f"{field}: required field is missing" in msg


def test_yaml_syntax_error_is_one_line_with_position(tmp_path):
    msg = _error(tmp_path, "name: x\nmodel: {source: a\ninput: [")
    assert "invalid YAML" in msg and "line" in msg and len(msg.splitlines()) == 1


def test_env_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("BUCKET", "my-bucket")
    monkeypatch.setenv("WORKERS", "3")
    doc = _with(input__uri="s3://${BUCKET}/in/", output__uri="s3://${BUCKET}/out/${RUN:-nightly}",
                compute__workers="${WORKERS}")
    spec = load_spec(_write(tmp_path, doc))
    assert spec.input.uri == "s3://my-bucket/in/" and spec.output.uri == "s3://my-bucket/out/nightly"
    assert spec.compute.workers == 3
    msg = _error(tmp_path, _with(input__uri="s3://${NOT_SET_ANYWHERE}/in"))
    assert msg.endswith("input.uri: environment variable NOT_SET_ANYWHERE is not set "
                        "(write ${NOT_SET_ANYWHERE:-default} for a default)")


def test_job_dir_variable(tmp_path):
    spec = load_spec(_write(tmp_path, _with(input__uri="${JOB_DIR}/data/r.jsonl")))
    assert spec.input.uri == str(tmp_path / "data" / "r.jsonl")


def test_set_overrides(tmp_path):
    spec = load_spec(_write(tmp_path, BASE), [
        "output.uri=s3://b/out/2024-01-01", 'sampling.stop=["\\n", "."]', "compute.workers=4",
        "metrics.pushgateway=http://pgw:9091", "engine.enable_prefix_caching=false", "prompt.system=",
    ])
    assert spec.output.uri == "s3://b/out/2024-01-01" and spec.sampling.stop == ["\n", "."]
    assert spec.compute.workers == 4 and spec.metrics.pushgateway == "http://pgw:9091"
    assert spec.engine.enable_prefix_caching is False and spec.prompt.system == ""
    assert "sampling.bogus: unknown key" in _error(tmp_path, BASE, "sampling.bogus=1")
    assert "expected path.to.key=value" in _error(tmp_path, BASE, "compute.workers")


def test_fingerprint_follows_results_not_speed(tmp_path):
    path = _write(tmp_path, BASE)
    fp = load_spec(path).fingerprint()
    assert load_spec(path, ["compute.workers=8", "engine.max_num_seqs=4", "cost.gpu_hour_usd=3"]).fingerprint() == fp
    assert load_spec(path, ["sampling.max_tokens=5"]).fingerprint() != fp


def test_remote_workers_get_a_resolved_spec(tmp_path, monkeypatch):
    """What a Ray task or a pod loads: variables filled, overrides applied, data paths absolute, a literal `${`
    kept literal, the same fingerprint from another folder without the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUCKET", "b")
    monkeypatch.setenv("TPL", "Cost ${PRICE}: {text}")  # a value that itself holds a `${`
    doc = _with(output__uri="s3://${BUCKET}/out", prompt__template="${TPL}", prompt__system="Use $${EURO} signs.",
                compute__backend="ray")
    spec = load_spec(_write(tmp_path, doc), ["sampling.max_tokens=7"])
    assert spec.prompt.template == "Cost ${PRICE}: {text}" and spec.prompt.system == "Use ${EURO} signs."
    monkeypatch.delenv("BUCKET")
    monkeypatch.delenv("TPL")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_spec(_write(elsewhere, spec.resolved_yaml(), "resolved.yaml"))
    assert again.model_dump() == spec.model_dump() and again.fingerprint() == spec.fingerprint()
    assert again.input.uri == str(tmp_path / "data" / "reviews.jsonl")
    assert again.output.uri == "s3://b/out" and again.sampling.max_tokens == 7
    assert spec.gpus_per_worker() == 1
    assert load_spec(_write(tmp_path, BASE), ["engine.device=cpu"]).gpus_per_worker() == 0
    assert load_spec(_write(tmp_path, BASE), ["engine.device=cpu", "compute.gpus_per_worker=2"]).gpus_per_worker() == 2


def test_cli_spec_errors_exit_2_without_traceback(tmp_path):
    path = _write(tmp_path, _with(engine__foo=1, sampling__top_p=0))
    for cmd in ("validate", "plan", "submit", "worker"):
        r = cli(cmd, path)
        assert r.exit_code == 2, (cmd, r.output)
        assert "Traceback" not in r.output + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert cli("validate", str(tmp_path / "nope.yaml")).exit_code == 2
    r = cli("validate", _write(tmp_path, BASE, "ok.yaml"))
    assert r.exit_code == 0 and r.output.startswith("ok: review-sentiment")


def test_help_everywhere():
    for cmd in ("validate", "plan", "submit", "worker", "status"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_worker_index(monkeypatch):
    for var in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_index(None, 1) == 0
    assert resolve_index(2, 4) == 2
    with pytest.raises(SpecError, match="no index"):
        resolve_index(None, 4)
    with pytest.raises(SpecError, match="--index: 4 is out of range"):
        resolve_index(4, 4)
    for var in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.setenv(var, "3")
        assert resolve_index(None, 4) == 3
        assert resolve_index(1, 4) == 1  # --index wins
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x")
    with pytest.raises(SpecError, match="SLURM_ARRAY_TASK_ID: expected a worker index"):
        resolve_index(None, 4)


def test_every_field_is_documented():
    """docs/job-spec.md names every field of the spec: as `a.b.c`, or in the row of its section (`a.*`)."""
    import os
    import typing

    from pydantic import BaseModel

    from batchllm.runner.spec import JobSpec

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "job-spec.md")) as f:
        doc = f.read()
    rows = {line.split("`")[1][:-2]: line for line in doc.splitlines() if line.startswith("| `") and ".*`" in line}

    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                   if isinstance(a, type) and issubclass(a, BaseModel)]
            yield from fields(sub[0], f"{prefix}{name}.") if sub else [(prefix, name)]

    missing = [f"{prefix}{name}" for prefix, name in fields(JobSpec)
               if f"`{prefix}{name}`" not in doc and f"{name}:" not in rows.get(prefix.rstrip("."), "")]
    assert not missing, f"fields missing from docs/job-spec.md: {missing}"
