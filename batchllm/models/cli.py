"""`batchllm models`: manage the local model cache.

    batchllm models pull smollm2-135m                      an alias
    batchllm models pull hf:HuggingFaceTB/SmolLM2-135M-Instruct
    batchllm models pull s3://bucket/models/llama --endpoint-url http://minio:9000
    batchllm models list
    batchllm models rm smollm2-135m

Imports only the store (standard library); never torch.
"""
import functools
import json
import sys

import click

from batchllm.models import store


def _user_errors(fn):
    """A user's mistake is one line on stderr and exit code 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except store.ModelError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@click.group()
def models():
    """Pull, list and remove models in the cache ($BATCHLLM_HOME, default ~/.cache/batchllm)."""


@models.command("pull")
@click.argument("source")
@click.option("--name", default=None, help="Cache name (default: derived from SOURCE).")
@click.option("--force", is_flag=True, help="Download again even if already cached.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, R2, ...).")
@_user_errors
def pull(source, name, force, endpoint_url):
    """Fetch SOURCE into the cache: an alias, hf:org/name, s3://..., gs://... or a local path."""
    manifest = store.pull_model(source, name=name, force=force, endpoint_url=endpoint_url)
    click.echo(f"{manifest['name']}  {_human(manifest['size'])}  {manifest['path']}")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@_user_errors
def list_(as_json):
    """Show pulled models; aliases not yet pulled are listed underneath."""
    rows = store.list_models()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = [("NAME", "SOURCE", "SIZE", "PATH")]
    table += [(r["name"], r.get("source", "?"), _human(r.get("size", 0)), r["path"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    pulled = {r["name"] for r in rows}
    missing = [a for a in sorted(store.ALIASES) if a not in pulled]
    if missing:
        click.echo(f"\naliases not pulled yet: {', '.join(missing)}")


@models.command("rm")
@click.argument("name")
@_user_errors
def rm(name):
    """Delete NAME (a cache name, or the source it was pulled from) from the cache."""
    manifest = store.remove(name)
    click.echo(f"removed {manifest['name']} ({_human(manifest.get('size', 0))})")
