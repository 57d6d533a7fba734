"""A GGUF's config and tokenizer, parsed once per file and kept as HF files.

transformers reads both from the GGUF header, which holds the whole vocabulary: SmolLM2's 49k tokens take
~4 s to parse, and an engine needs the header for its config and again for its tokenizer. The first load saves
them (`save_pretrained`) under $BATCHLLM_HOME/gguf-meta/<key>, keyed by the file's absolute path, size and
mtime; later loads (the engine's second look at the config for the weight names, each worker, each run)
read those small files instead. Nothing is cached where the directory is not writable; loads then parse again.
"""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from batchllm.models.store import home


def _cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return home() / "gguf-meta" / key


def load(gguf: Path, kind: str, auto_cls):
    """auto_cls (AutoConfig or AutoTokenizer) for the GGUF: from the saved files, else parsed and saved."""
    saved = cached(gguf, kind)
    if saved:
        return auto_cls.from_pretrained(str(saved), trust_remote_code=False)
    obj = auto_cls.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    save(gguf, kind, obj)
    return obj


def cached(gguf: Path, kind: str) -> Path | None:
    """The directory holding the saved `kind` ('config' or 'tokenizer') of this GGUF, or None."""
    d = _cache_dir(gguf) / kind
    return d if (d / ".complete").exists() else None


def save(gguf: Path, kind: str, obj) -> None:
    """obj.save_pretrained() into the cache, atomically; a failure (read-only home, full disk) only costs speed."""
    target = _cache_dir(gguf) / kind
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}-"))
        obj.save_pretrained(str(tmp))
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, target)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
