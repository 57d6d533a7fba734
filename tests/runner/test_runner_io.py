"""Inputs, shards, row streaming, atomic commits, checkpoints and writers (no engine)."""
import json

import fsspec
import pyarrow as pa
import pytest

from batchllm.runner import dataset
from batchllm.runner.checkpoint import RangeSet, ShardCheckpoint, ranges_of
from batchllm.runner.openai_batch import parse_request
from batchllm.runner.prompts import PromptBuilder, RowError
from batchllm.runner.spec import InputSpec, PromptSpec, SpecError
from batchllm.runner.storage import Store
from batchllm.runner.writer import PartWriter, _convert
from runner_helpers import jsonl_bytes, openai_rows, parquet_bytes, review_rows


def _all_rows(fs, shards, fmt, **kw):
    return [(pos, row, err) for pieces in shards for _, pos, row, err in dataset.iter_rows(fs, pieces, fmt, **kw)]


def test_jsonl_byte_range_shards_cut_on_line_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "_CHUNK", 7)  # lines straddle read chunks
    rows = review_rows(23)
    text = jsonl_bytes(rows[:10]) + b"\n  \n" + jsonl_bytes(rows[10:]).rstrip(b"\n")  # blank lines, no final \n
    (tmp_path / "a.jsonl").write_bytes(text)
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(review_rows(4, start=23)))
    fs, paths = dataset.discover(InputSpec(uri=str(tmp_path)), None)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.jsonl", "b.jsonl"]
    shards, _ = dataset.make_shards(fs, paths, "jsonl", 10)
    assert [sum(p["rows"] for p in s) for s in shards] == [10, 10, 7]
    assert len(shards[2]) == 2  # spans both files
    for s in shards:
        for p in s:
            if p["start"]:
                assert text[p["start"] - 1:p["start"]] == b"\n"  # starts right after a newline
    got = _all_rows(fs, shards, "jsonl")
    assert [pos for pos, _, _ in got] == list(range(27))
    assert [r["review_id"] for _, r, _ in got] == [r["review_id"] for r in review_rows(27)]


def test_parquet_shards_by_row_groups_and_skip(tmp_path):
    rows = review_rows(30)
    for i, part in enumerate([rows[:12], rows[12:22], rows[22:]]):
        (tmp_path / f"p{i}.parquet").write_bytes(parquet_bytes(part, row_group_size=4))
    fs, paths = dataset.discover(InputSpec(uri=str(tmp_path / "*.parquet")), None)
    assert dataset.detect_format(fs, paths, "auto") == "parquet"
    shards, schema = dataset.make_shards(fs, paths, "parquet", 10)
    assert [[(p["uri"].rsplit("/", 1)[1], p["row_groups"]) for p in s] for s in shards] == [
        [("p0.parquet", [0, 1, 2])], [("p1.parquet", [0, 1, 2])], [("p2.parquet", [0, 1])]]
    assert schema.names == ["review_id", "text", "stars"]
    got = _all_rows(fs, shards, "parquet", columns=["text", "nope"])
    assert [pos for pos, _, _ in got] == list(range(30)) and set(got[0][1]) == {"text"}
    # committed ordinals are not read again; a fully committed row group is skipped whole
    skip = RangeSet([(0, 4), (5, 6)])
    got = [o for o, _, _, _ in dataset.iter_rows(fs, shards[0], "parquet", skip=skip)]
    assert got == [4] + list(range(6, 12))


def test_format_detection_and_input_errors(tmp_path):
    (tmp_path / "batch.jsonl").write_bytes(jsonl_bytes(openai_rows(review_rows(2))))
    fs, paths = dataset.discover(InputSpec(uri=str(tmp_path / "batch.jsonl")), None)
    assert dataset.detect_format(fs, paths, "auto") == "openai-batch"
    assert dataset.detect_format(fs, paths, "jsonl") == "jsonl"
    with pytest.raises(SpecError, match="input files are JSONL"):
        dataset.detect_format(fs, paths, "parquet")
    with pytest.raises(SpecError, match="input.uri: no input files"):
        dataset.discover(InputSpec(uri=str(tmp_path / "missing")), None)
    (tmp_path / "c.jsonl.gz").write_bytes(b"x")
    with pytest.raises(SpecError, match="compressed"):
        dataset.discover(InputSpec(uri=str(tmp_path / "*.gz")), None)


def test_malformed_lines_are_row_errors(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n[1, 2]\n')
    fs, paths = dataset.discover(InputSpec(uri=str(tmp_path / "a.jsonl")), None)
    shards, _ = dataset.make_shards(fs, paths, "jsonl", 100)
    got = _all_rows(fs, shards, "jsonl")
    assert got[0] == (0, {"text": "ok"}, None)
    assert got[1][2][0] == "malformed_json" and got[2][2][0] == "malformed_json"


def test_range_set():
    s = RangeSet()
    for x in (5, 3, 4, 10, 0):
        s.add(x)
    assert s.ranges() == [[0, 1], [3, 6], [10, 11]] and len(s) == 5
    s.add_range(1, 3)
    assert s.ranges() == [[0, 6], [10, 11]]
    assert s.covers(0, 6) and not s.covers(0, 7) and 10 in s and 9 not in s
    assert ranges_of([7, 1, 2, 3, 9, 8]) == [[1, 4], [7, 10]]


def test_put_atomic_and_orphans_on_local_and_memory(tmp_path):
    for uri in (str(tmp_path / "out"), "memory://bucket/out-test"):
        store = Store(uri)
        store.put_atomic("results/part-00000-00000.parquet", b"one")
        store.put_atomic("results/part-00000-00001.parquet", b"orphan")  # never recorded
        store.put_atomic("errors/part-00000-00001.parquet", b"orphan")
        store.put_atomic("results/part-00001-00000.parquet", b"other shard")
        ck = ShardCheckpoint.load(store, 0, "fp", 10)
        ck.add_part({"seq": 0, "results": "results/part-00000-00000.parquet", "errors": None, "rows": [[0, 4]],
                     "num_ok": 4, "num_error": 0})
        assert ck.remove_orphans() == ["results/part-00000-00001.parquet", "errors/part-00000-00001.parquet"]
        assert store.listdir("results") == ["part-00000-00000.parquet", "part-00001-00000.parquet"]
        assert store.listdir("errors") == []
        again = ShardCheckpoint.load(store, 0, "fp", 10)
        assert again.committed.ranges() == [[0, 4]] and again.next_seq() == 1
        assert ShardCheckpoint.load(store, 0, "other-fingerprint", 10).parts == []
    assert list((tmp_path / "out" / "_batchllm" / "tmp").iterdir()) == []  # no temporaries left


def test_writer_parts_have_one_schema(tmp_path):
    store = Store(str(tmp_path / "out"))
    key = pa.schema([pa.field("id", pa.string()), pa.field("stars", pa.int64())])
    w = PartWriter(store, 3, "table", "parquet", key, convert=True)
    w.add_result(0, {"id": 7, "stars": 4.0, "output": "good", "finish_reason": "stop", "prompt_tokens": 5,
                     "completion_tokens": 1}, 5, 1)
    w.add_error(1, {"id": None, "row": 12, "error_type": "malformed_json", "message": "bad"})
    part = w.commit(0)
    assert part["results"] == "results/part-00003-00000.parquet" and part["rows"] == [[0, 2]]
    import pyarrow.parquet as pq

    t = pq.read_table(str(tmp_path / "out" / part["results"]))
    assert t.to_pylist() == [{"id": "7", "stars": 4, "output": "good", "finish_reason": "stop",
                              "prompt_tokens": 5, "completion_tokens": 1}]
    assert pq.read_table(str(tmp_path / "out" / part["errors"])).column_names == ["id", "row", "error_type", "message"]
    assert _convert("x", pa.int64()) is None and _convert({"a": 1}, pa.string()) == '{"a": 1}'


def test_prompt_builder():
    b = PromptBuilder(PromptSpec(system="sys", template="Review: {text} ({stars} stars)"))
    assert b.columns == ["text", "stars"]
    assert b.build({"text": "nice", "stars": 5}) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Review: nice (5 stars)"}]
    with pytest.raises(RowError) as e:
        b.build({"text": "nice"})
    assert e.value.error_type == "missing_column" and "'stars'" in e.value.message
    with pytest.raises(RowError):
        b.build({"text": None, "stars": 1})
    raw = PromptBuilder(PromptSpec(system="sys", column="body", chat=False))
    assert raw.build({"body": "hello"}) == "sys\n\nhello"
    msgs = PromptBuilder(PromptSpec(messages_column="conv"))
    assert msgs.build({"conv": json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])}) == [
        {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("change, code", [
    ({"url": "/v1/embeddings"}, "invalid_request"),
    ({"method": "GET"}, "invalid_request"),
    ({"custom_id": None}, "invalid_request"),
    ({"body": {"max_tokens": 3}}, "missing_column"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}}, "invalid_params"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}}, "invalid_params"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "top_p": 0}}, "invalid_params"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "stop": [3]}}, "invalid_params"),
    ({"body": {"messages": [{"role": "user", "content": "x"}], "n": 2}}, "invalid_params"),
    ({"body": {"messages": "not a list"}}, "malformed_json"),
])
def test_openai_request_errors(change, code):
    line = dict(openai_rows(review_rows(1))[0], **change)
    with pytest.raises(RowError) as e:
        parse_request(line)
    assert e.value.error_type == code


def test_openai_request_params():
    line = openai_rows(review_rows(1), url="/v1/completions", max_tokens=3, temperature=0.5, top_p=0.9,
                       seed=7, stop="\n")[0]
    cid, prompt, url, params = parse_request(line)
    assert cid == "r0000" and prompt.startswith("Review:") and url == "/v1/completions"
    assert params == {"max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"]}
    line["body"]["max_completion_tokens"] = 9
    assert parse_request(line)[3]["max_tokens"] == 9


def test_memory_filesystem_input():
    fs = fsspec.filesystem("memory")
    fs.pipe("/in-mem/r.jsonl", jsonl_bytes(review_rows(5)))
    fs_, paths = dataset.discover(InputSpec(uri="memory://in-mem/"), None)
    shards, _ = dataset.make_shards(fs_, paths, "jsonl", 2)
    assert [s[0]["uri"] for s in shards] == ["memory:///in-mem/r.jsonl"] * 3
    assert len(_all_rows(fs_, shards, "jsonl")) == 5
