"""Input datasets through fsspec: find the files, detect the format, cut shards, stream rows.

- Parquet is cut into shards of whole row groups (file metadata only, no data read at plan time).
- JSONL (and OpenAI batch files, which are JSONL) is cut into byte ranges on line boundaries, in one
  streaming pass that also counts the rows, so shards hold exactly `rows_per_shard` rows.
- A shard is a list of pieces, each a dict that goes into plan.json as is:
  {"uri", "kind": "parquet", "row_groups": [...], "rows", "first_row"} or
  {"uri", "kind": "jsonl", "start", "end", "rows", "first_row"}; first_row is the dataset position of the
  piece's first row (the default row id).
- Rows stream: one row group batch or one line at a time, whatever the dataset size. Blank lines are
  not rows.
"""
import json
import posixpath

from batchllm.runner.spec import SpecError
from batchllm.runner.storage import filesystem, full_uri

PARQUET_EXT = (".parquet", ".pq", ".parq")
JSONL_EXT = (".jsonl", ".ndjson", ".json")
_CHUNK = 4 << 20
SAMPLE_ROWS = 200


def _is_data_file(path: str) -> bool:
    base = posixpath.basename(path)
    return not base.startswith((".", "_")) and base.lower().endswith(PARQUET_EXT + JSONL_EXT)


def discover(input_spec, storage):
    """(fs, sorted file paths) for a file, a folder (searched recursively) or a glob."""
    uri = input_spec.uri
    fs, path = filesystem(uri, storage)
    try:
        if any(c in path for c in "*?["):
            paths = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if _is_data_file(p)]
        elif fs.exists(path):
            paths = [path]
        else:
            paths = []
    except (PermissionError, OSError) as e:
        raise SpecError(f"input.uri: cannot list {uri}: {e}") from None
    if not paths:
        raise SpecError(f"input.uri: no input files at {uri} (a file, a folder or a glob of "
                        f"{', '.join(PARQUET_EXT + JSONL_EXT)} files)")
    for p in paths:
        if p.lower().endswith((".gz", ".bz2", ".zst", ".xz")):
            raise SpecError(f"input.uri: {full_uri(fs, p)} is compressed; JSONL must be uncompressed to be "
                            "cut into byte ranges (Parquet compresses internally)")
    return fs, sorted(paths)


def _first_line(fs, path):
    with fs.open(path, "rb") as f:
        for line in f:
            if line.strip():
                return line
    return b""


def detect_format(fs, paths, declared: str) -> str:
    """parquet | jsonl | openai-batch, from the declared format or the first file."""
    first = paths[0].lower()
    kinds = {"parquet" if p.lower().endswith(PARQUET_EXT) else "jsonl" for p in paths}
    if len(kinds) > 1:
        raise SpecError("input.uri: mixes Parquet and JSONL files; point it at one format")
    if declared == "parquet" or (declared == "auto" and first.endswith(PARQUET_EXT)):
        if kinds != {"parquet"}:
            raise SpecError("input.format: parquet, but the input files are JSONL; use jsonl or openai-batch")
        return "parquet"
    if kinds != {"jsonl"}:
        raise SpecError(f"input.format: {declared}, but the input files are Parquet; use parquet")
    if declared != "auto":
        return declared
    try:
        obj = json.loads(_first_line(fs, paths[0]))
    except ValueError:
        return "jsonl"
    if isinstance(obj, dict) and {"custom_id", "body", "url"} <= set(obj):
        return "openai-batch"
    return "jsonl"


# ---- shards ----------------------------------------------------------------------------------

def _parquet_shards(fs, paths, rows_per_shard):
    import pyarrow.parquet as pq

    shards, current, current_rows, position, schema = [], [], 0, 0, None
    for path in paths:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if schema is None:
                schema = pf.schema_arrow
            meta = pf.metadata
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n == 0:
                    continue
                last = current[-1] if current else None
                if last is not None and last["uri"] == full_uri(fs, path):
                    last["row_groups"].append(rg)
                    last["rows"] += n
                else:
                    current.append({"uri": full_uri(fs, path), "kind": "parquet", "row_groups": [rg],
                                    "rows": n, "first_row": position})
                position += n
                current_rows += n
                if current_rows >= rows_per_shard:
                    shards.append(current)
                    current, current_rows = [], 0
    if current:
        shards.append(current)
    return shards, schema


def _jsonl_shards(fs, paths, rows_per_shard):
    """One streaming pass: count non-blank lines and cut a shard after every rows_per_shard of them."""
    shards, current, current_rows, position = [], [], 0, 0
    for path in paths:
        uri = full_uri(fs, path)
        piece = None
        offset = 0  # byte offset of the start of `carry`
        carry = b""
        with fs.open(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                data = carry + chunk
                lines = data.split(b"\n")
                carry = lines.pop() if chunk else b""
                if not chunk and lines == [b""]:
                    lines = []
                for line in lines:
                    end = offset + len(line) + 1
                    if line.strip():
                        if piece is None:
                            piece = {"uri": uri, "kind": "jsonl", "start": offset, "end": end, "rows": 0,
                                     "first_row": position}
                            current.append(piece)
                        piece["rows"] += 1
                        piece["end"] = end
                        position += 1
                        current_rows += 1
                        if current_rows >= rows_per_shard:
                            shards.append(current)
                            current, current_rows, piece = [], 0, None
                    offset = end
                if not chunk:
                    break
    if current:
        shards.append(current)
    return shards


def make_shards(fs, paths, fmt, rows_per_shard):
    """(shards, parquet arrow schema or None)."""
    if fmt == "parquet":
        return _parquet_shards(fs, paths, rows_per_shard)
    return _jsonl_shards(fs, paths, rows_per_shard), None


# ---- rows ------------------------------------------------------------------------------------

def parse_line(line: bytes):
    """(dict, None) or (None, (error_type, message)) for one JSONL line."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, ("malformed_json", f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return None, ("malformed_json", f"expected a JSON object per line, got {type(obj).__name__}")
    return obj, None


def _iter_jsonl_piece(fs, piece):
    path = fs._strip_protocol(piece["uri"])
    with fs.open(path, "rb") as f:
        f.seek(piece["start"])
        pos = piece["start"]
        while pos < piece["end"]:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            if line.strip():
                yield line


def iter_rows(fs, pieces, fmt, columns=None, skip=None):
    """Yield (ordinal, position, row_dict | None, error | None) for a shard's rows, in order.

    ordinal counts rows within the shard; position is the row's place in the dataset. `skip(ordinal)`
    true means the row was committed already: it is not read (Parquet: whole row groups are skipped).
    `columns`: the Parquet columns to read (missing ones are left out of the row dicts).
    """
    import pyarrow.parquet as pq

    ordinal = 0
    for piece in pieces:
        if piece["kind"] == "jsonl":
            position = piece["first_row"]
            if skip is not None and skip.covers(ordinal, ordinal + piece["rows"]):
                ordinal += piece["rows"]
                continue
            for line in _iter_jsonl_piece(fs, piece):
                if skip is None or not skip(ordinal):
                    row, err = parse_line(line)
                    yield ordinal, position, row, err
                ordinal += 1
                position += 1
            continue
        path = fs._strip_protocol(piece["uri"])
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            present = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
            position = piece["first_row"]
            for rg in piece["row_groups"]:
                n = pf.metadata.row_group(rg).num_rows
                if skip is not None and skip.covers(ordinal, ordinal + n):
                    ordinal += n
                    position += n
                    continue
                for batch in pf.iter_batches(batch_size=512, row_groups=[rg], columns=present):
                    for row in batch.to_pylist():
                        if skip is None or not skip(ordinal):
                            yield ordinal, position, row, None
                        ordinal += 1
                        position += 1


def sample_rows(fs, shards, fmt, limit=SAMPLE_ROWS):
    """Up to `limit` parsed rows from the start of the dataset (for estimates and JSONL types)."""
    out = []
    for shard in shards:
        for _, _, row, _ in iter_rows(fs, shard, fmt):
            if row is not None:
                out.append(row)
            if len(out) >= limit:
                return out
    return out


def open_input(uri: str, storage):
    """The filesystem for a piece's URI (all pieces of a job share one)."""
    return filesystem(uri, storage)[0]
