"""The model cache: turn what a user names (an alias, a path, s3://, gs://, hf:org/name) into a local path.

Layout (``BATCHLLM_HOME``, default ``~/.cache/batchllm``)::

    models/
      smollm2-135m/
        manifest.json          {"name", "source", "size", "pulled_at", "entry"}
        model/SmolLM2-135M-Instruct.Q4_1.gguf
      hf--HuggingFaceTB--SmolLM2-135M-Instruct/
        manifest.json
        model/config.json, model.safetensors, tokenizer.json, ...
      .tmp-*                   a pull in progress; never listed

``entry`` is what ``resolve`` returns, relative to the model's folder: ``model`` for an HF-style
directory, ``model/NAME.gguf`` for a GGUF file. A pull writes everything into a ``.tmp-*`` folder and
renames it into place last, so a half-pulled model is never listed or resolved. How each kind of source
is fetched is batchllm/models/sources.py.

This module imports only the standard library at the top: ``batchllm models list`` must not pay for
torch, and the engine must not need fsspec or huggingface_hub unless a source asks for them.
"""
import datetime
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from batchllm.models.sources import ALIASES, REMOTE_SCHEMES, ModelError, fetch, is_remote

__all__ = ["ALIASES", "ModelError", "cache_name", "home", "list_models", "models_dir", "pull", "pull_model",
           "remove", "resolve"]

_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# cache layout


def home() -> Path:
    """The cache root: $BATCHLLM_HOME, else ~/.cache/batchllm."""
    env = os.environ.get("BATCHLLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchllm"


def models_dir() -> Path:
    return home() / "models"


def cache_name(source: str) -> str:
    """The cache folder name for a source: aliases keep their name, remote sources are flattened.

    hf:org/name -> hf--org--name; s3://bucket/a/b -> s3--bucket--a--b; a local dir -> its basename.
    """
    source = source.strip()
    if source in ALIASES:
        return source
    if source.startswith("hf:"):
        flat = "hf--" + source[3:].strip("/").replace("/", "--")
    elif source.startswith(REMOTE_SCHEMES):
        scheme, rest = source.split("://", 1)
        flat = f"{scheme}--" + rest.strip("/").replace("/", "--")
    elif _looks_like_path(source) or os.path.exists(source):
        flat = Path(source).expanduser().resolve().name
    else:
        flat = source
    # Folder-safe: keep letters, digits and . _ - @; a leading dot would hide it from list_models.
    flat = re.sub(r"[^A-Za-z0-9._@-]+", "-", flat).lstrip(".")
    return flat or "model"


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith((".", "~"))
            or source.endswith(".gguf"))


def _read_manifest(folder: Path) -> dict | None:
    try:
        with open(folder / _MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None  # not a finished pull (or not ours): invisible
    manifest["name"] = folder.name
    manifest["path"] = str(folder / manifest.get("entry", "model"))
    return manifest


def _find_cached(source: str) -> dict | None:
    """The manifest of a cached model named `source`, or pulled from `source`; None if absent."""
    root = models_dir()
    for name in (source, cache_name(source)):
        if name and not name.startswith(".") and "/" not in name and (root / name).is_dir():
            manifest = _read_manifest(root / name)
            if manifest is not None:
                return manifest
    for manifest in list_models():  # e.g. `rm s3://bucket/x` after `pull s3://bucket/x --name x`
        if manifest.get("source") == source:
            return manifest
    return None


# ---------------------------------------------------------------------------------------------
# public API


def list_models() -> list[dict]:
    """Pulled models, by name: dicts with name, source, size (bytes), pulled_at, path."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        manifest = _read_manifest(folder)
        if manifest is not None:
            out.append(manifest)
    return out


def resolve(source: str, pull: bool = True, storage_options: dict | None = None,
            endpoint_url: str | None = None) -> str:
    """A local path (HF directory or .gguf file) for `source`, pulling into the cache if needed.

    `source`: an alias (``smollm2-135m``), a cached model's name, a local directory or .gguf file
    (returned as-is), ``s3://``/``gs://`` URLs, or ``hf:org/name[/file.gguf][@revision]``.
    `storage_options` go to fsspec; `endpoint_url` is a shortcut for S3-compatible stores.
    """
    source = _check_source(source)
    if is_remote(source) or source in ALIASES:
        cached = _find_cached(source)
        if cached is not None:
            return cached["path"]
        if not pull:
            raise ModelError(f"model {source!r} is not in the cache ({models_dir()}); "
                             f"run `batchllm models pull {source}`")
        return pull_model(source, storage_options=storage_options, endpoint_url=endpoint_url)["path"]
    # A bare word is a cache name first; a path-looking string is always a path.
    if not _looks_like_path(source):
        cached = _find_cached(source)
        if cached is not None:
            return cached["path"]
    return _check_local(source)


def pull_model(source: str, name: str | None = None, force: bool = False,
               storage_options: dict | None = None, endpoint_url: str | None = None) -> dict:
    """Fetch `source` into the cache as `name` (default: cache_name(source)); returns its manifest.

    Already cached (and not `force`): returns the cached one without touching the network.
    """
    source = _check_source(source)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]*", name):
        raise ModelError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', '@'")
    name = name or cache_name(source)
    root = models_dir()
    target = root / name
    if not force:
        existing = _read_manifest(target) if target.is_dir() else None
        if existing is not None:
            return existing

    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root)
    # The temp folder lives inside the cache so the final rename is on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        model = tmp / "model"
        model.mkdir()
        named = is_remote(source) or source in ALIASES
        entry = fetch(source if named else _check_local(source), model, storage_options, endpoint_url)
        manifest = {
            "source": source,
            "size": _tree_size(model),
            "pulled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "entry": str(Path("model") / entry) if entry else "model",
        }
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
        if force and target.exists():
            _remove_folder(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else (another worker) finished the same pull first: theirs is as good.
            if _read_manifest(target) is None:
                raise
        return _read_manifest(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# `pull` is the name the contract uses; `pull_model` avoids shadowing resolve()'s `pull` flag.
pull = pull_model


def remove(name: str) -> dict:
    """Delete a cached model by name (or by the source it was pulled from); returns its manifest."""
    manifest = _find_cached(_check_source(name))
    if manifest is None:
        raise ModelError(f"no model {name!r} in the cache ({models_dir()}); see `batchllm models list`")
    _remove_folder(models_dir() / manifest["name"])
    return manifest


# ---------------------------------------------------------------------------------------------
# checks


def _check_source(source) -> str:
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ModelError(f"model must be a non-empty string (alias, path, s3://, gs:// or hf:org/name), "
                         f"got {source!r}")
    return str(source).strip()


def _check_local(source: str) -> str:
    """A local model path, checked: a directory, or a .gguf file."""
    path = Path(source).expanduser()
    if not path.exists():
        aliases = ", ".join(sorted(ALIASES))
        raise ModelError(f"model {source!r} not found: not a local path, not in the cache "
                         f"({models_dir()}), not an alias ({aliases})")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelError(f"model {source!r} is a file but not .gguf; give a model directory "
                         f"(config.json + *.safetensors) or a .gguf file")
    return str(path.resolve())


def _tree_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _sweep_stale(root: Path, max_age_s: float = 86400) -> None:
    """Delete what killed pulls left behind; young ones may be another process's pull in progress."""
    now = time.time()
    for folder in root.glob(".*-*"):
        if folder.name.startswith((".tmp-", ".trash-")) and now - folder.stat().st_mtime > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)


def _remove_folder(folder: Path) -> None:
    # Rename first so the model vanishes at once, even if deleting many GB takes a while.
    trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
