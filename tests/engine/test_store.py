"""batchllm.models.store and `batchllm models`: the cache, local and S3 pulls (moto), errors, CLI."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from batchllm.models import loader, store
from batchllm.models.cli import models as models_cli
from batchllm.models.sources import FetchError
from batchllm.models.store import ModelError


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("BATCHLLM_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    (path / "pytorch_model.bin").write_bytes(b"never copied")  # pickles are not pulled
    return path


def test_home_honours_env(home):
    assert store.home() == home
    assert store.models_dir() == home / "models"
    assert store.list_models() == []


def test_pull_local_list_resolve_rm(home, tiny_dir):
    manifest = store.pull(str(tiny_dir))
    assert manifest["name"] == "tiny-llama"
    assert manifest["path"] == str(home / "models" / "tiny-llama" / "model")
    assert not (home / "models" / "tiny-llama" / "model" / "pytorch_model.bin").exists()
    [listed] = store.list_models()
    assert listed["source"] == str(tiny_dir) and listed["size"] > 0 and listed["pulled_at"]
    # By name it comes from the cache; by path the local dir is used as-is.
    assert store.resolve("tiny-llama") == manifest["path"]
    assert store.resolve(str(tiny_dir)) == str(tiny_dir)
    a = dict(loader.iter_weights(store.resolve("tiny-llama")))
    b = dict(loader.iter_weights(tiny_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert store.remove("tiny-llama")["name"] == "tiny-llama"
    assert store.list_models() == []
    with pytest.raises(ModelError, match="no model 'tiny-llama'"):
        store.remove("tiny-llama")
    assert [p.name for p in (home / "models").iterdir()] == []  # no temp or trash left behind


def test_resolve_errors(home, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        store.resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="not an alias"):
        store.resolve("no-such-model")
    with pytest.raises(ModelError, match="not in the cache"):
        store.resolve("smollm2-135m", pull=False)
    with pytest.raises(ModelError, match="non-empty"):
        store.resolve("")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="not .gguf"):
        store.resolve(str(tmp_path / "w.bin"))


def test_failed_pull_leaves_nothing(home, tmp_path):
    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text("{}")
    (only_bin / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickled .bin/.pt weights are not supported"):
        store.pull(str(only_bin))
    assert store.list_models() == []
    assert list((home / "models").iterdir()) == []


def test_half_written_folder_is_invisible(home, tiny_dir):
    store.pull(str(tiny_dir))
    (home / "models" / ".tmp-x-123" / "model").mkdir(parents=True)
    (home / "models" / "no-manifest").mkdir()
    assert [m["name"] for m in store.list_models()] == ["tiny-llama"]


def test_hf_errors(home, monkeypatch):
    with pytest.raises(ModelError, match="expected hf:org/name"):
        store.pull("hf:justone")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ModelError, match="need huggingface_hub"):
        store.resolve("hf:org/name")


def _fake_hub(monkeypatch, files, fail=None):
    """A stand-in huggingface_hub: a repo of `files` (name -> bytes), or every call raising `fail`."""
    import types

    calls = []

    def list_repo_files(repo_id, revision=None):
        if fail:
            raise fail
        return sorted(files)

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None, ignore_patterns=None):
        import fnmatch

        calls.append((allow_patterns, ignore_patterns))
        for name, data in files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns or ["*"]) and not any(
                    fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                os.makedirs(os.path.join(local_dir, os.path.dirname(name)), exist_ok=True)
                with open(os.path.join(local_dir, name), "wb") as f:
                    f.write(data)
        os.makedirs(os.path.join(local_dir, ".cache"), exist_ok=True)
        return local_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(
        list_repo_files=list_repo_files, snapshot_download=snapshot_download))
    return calls


def test_hf_unreachable(home, monkeypatch):
    _fake_hub(monkeypatch, {}, fail=OSError("We couldn't connect to 'https://huggingface.co'\nmore"))
    with pytest.raises(FetchError, match="could not download hf:org/name from the Hugging Face Hub: "
                                         "We couldn't connect"):  # may pass when tried again: a FetchError
        store.resolve("hf:org/name")
    assert store.list_models() == []


def test_hf_pull_picks_files(home, monkeypatch, tiny_dir):
    files = {f.name: f.read_bytes() for f in tiny_dir.iterdir()}
    files.update({"model-Q4.gguf": b"gguf", "README.md": b"hi"})
    _fake_hub(monkeypatch, files)
    path = store.resolve("hf:org/tiny@main")
    assert path.endswith("hf--org--tiny@main/model")
    got = sorted(os.listdir(path))  # safetensors + json; no gguf, no pickle, no README, no .cache
    assert got == sorted(f for f in files if f.endswith((".json", ".safetensors")))
    assert dict(loader.iter_weights(path)).keys() == dict(loader.iter_weights(tiny_dir)).keys()


def test_hf_gguf_repos(home, monkeypatch):
    _fake_hub(monkeypatch, {"a.Q4_0.gguf": b"x", "a.Q8_0.gguf": b"y", "config.json": b"{}"})
    with pytest.raises(ModelError, match="holds 2 GGUF files .*name one: hf:org/g/a.Q4_0.gguf"):
        store.pull("hf:org/g")
    manifest = store.pull("hf:org/g/a.Q8_0.gguf")
    assert manifest["path"].endswith("model/a.Q8_0.gguf") and open(manifest["path"], "rb").read() == b"y"
    _fake_hub(monkeypatch, {"pytorch_model.bin": b"x", "config.json": b"{}"})
    with pytest.raises(ModelError, match="pickled .bin/.pt weights are not supported"):
        store.pull("hf:org/pickles")


def test_bad_pull_name(home, tiny_dir):
    with pytest.raises(ModelError, match="invalid model name"):
        store.pull(str(tiny_dir), name="../escape")


def test_cache_names():
    assert store.cache_name("smollm2-135m") == "smollm2-135m"
    assert store.cache_name("hf:HuggingFaceTB/SmolLM2-135M") == "hf--HuggingFaceTB--SmolLM2-135M"
    assert store.cache_name("s3://bucket/models/llama/") == "s3--bucket--models--llama"


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_bad_name_exits_2(home):
    result = CliRunner().invoke(models_cli, ["rm", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: no model 'nope'")
    assert "Traceback" not in result.output
    result = CliRunner().invoke(models_cli, ["pull", "/does/not/exist"])
    assert result.exit_code == 2 and "not found" in result.output


def test_cli_pull_list_rm(home, tiny_dir):
    runner = CliRunner()
    assert runner.invoke(models_cli, ["pull", str(tiny_dir), "--name", "mine"]).exit_code == 0
    out = runner.invoke(models_cli, ["list"]).output
    assert out.splitlines()[0].split() == ["NAME", "SOURCE", "SIZE", "PATH"]
    assert "mine" in out and str(tiny_dir) in out and "smollm2-135m" in out  # alias not pulled yet
    [row] = [json.loads(line) for line in runner.invoke(models_cli, ["list", "--json"]).output.splitlines()]
    assert row["name"] == "mine"
    result = runner.invoke(models_cli, ["rm", "mine"])
    assert result.exit_code == 0 and "removed mine" in result.output


# --- S3 through moto's server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)


def test_s3_pull(home, tiny_dir, s3_endpoint, s3_env):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    if not fs.exists("models"):
        fs.mkdir("models")
    fs.put(str(tiny_dir), "models/tiny", recursive=True)

    path = store.resolve("s3://models/tiny", endpoint_url=s3_endpoint)
    [m] = store.list_models()
    assert m["name"] == "s3--models--tiny" and m["source"] == "s3://models/tiny" and path == m["path"]
    assert not os.path.exists(os.path.join(path, "pytorch_model.bin"))
    a = dict(loader.iter_weights(path))
    b = dict(loader.iter_weights(tiny_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Cached now: resolving again needs no endpoint (a wrong one would fail if it were used).
    assert store.resolve("s3://models/tiny", endpoint_url="http://127.0.0.1:9") == path
    store.remove("s3://models/tiny")

    # storage_options spelled out, as a job spec would pass them
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    assert store.resolve("s3://models/tiny", storage_options=opts).endswith("s3--models--tiny/model")


def test_s3_missing(home, s3_endpoint, s3_env):
    with pytest.raises(ModelError, match="s3://models/absent") as e:
        store.resolve("s3://models/absent", endpoint_url=s3_endpoint)
    assert not isinstance(e.value, FetchError)  # a wrong name: no retry will find it
    assert store.list_models() == []
