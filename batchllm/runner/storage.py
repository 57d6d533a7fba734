"""Storage through fsspec: local paths, s3:// (s3fs), gs:// (gcsfs), memory://.

`Store` binds a filesystem to one root URI (the job's output) and gives the few operations the runner
needs, with one rule for commits: a file appears under its final name whole or not at all.
- local: written to OUTPUT/_batchllm/tmp/ (same filesystem), fsynced, then os.replace()d into place;
- object stores: one PUT of the whole body (fs.pipe), which S3 and GCS make visible atomically.
"""
import json
import os
import posixpath
import uuid

import fsspec


def storage_options(uri: str, storage) -> dict:
    """fsspec options for `uri` from the spec's `storage` section."""
    opts = dict(storage.options) if storage is not None else {}
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("s3", "s3a") and storage is not None and storage.endpoint_url:
        opts.setdefault("client_kwargs", {})
        opts["client_kwargs"] = dict(opts["client_kwargs"], endpoint_url=storage.endpoint_url)
    if protocol in ("file", "local", "memory"):
        opts = {}
    return opts


def filesystem(uri: str, storage=None):
    """(fs, path) for a URI; credentials come from the usual env/profile chain of each backend."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, storage))
    return fs, path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def full_uri(fs, path: str) -> str:
    """A path on fs as a URI another process can open (memory:// only within this process)."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


class Store:
    """The job's output root: results/, errors/ and _batchllm/ live under it."""

    def __init__(self, uri: str, storage=None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, storage)
        self.root = self.root.rstrip("/")
        self.local = is_local(self.fs)

    def path(self, *parts) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts) -> str:
        return full_uri(self.fs, self.path(*parts))

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        self.fs.invalidate_cache(path)  # another process may have written it
        return self.fs.exists(path)

    def read_bytes(self, rel: str):
        """The file's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def put_atomic(self, rel: str, data: bytes) -> None:
        """Make `rel` hold exactly `data`, all at once."""
        final = self.path(rel)
        if self.local:
            tmp_dir = self.path("_batchllm", "tmp")
            os.makedirs(tmp_dir, exist_ok=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(final, data)

    def write_json(self, rel: str, obj) -> None:
        self.put_atomic(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def listdir(self, rel: str) -> list[str]:
        """Names of the files directly under `rel` (empty when missing)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without refresh=
            entries = self.fs.ls(self.path(rel), detail=False)
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass
