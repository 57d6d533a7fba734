"""`batchllm validate|plan|submit|worker|status`: the job runner's commands (wired in batchllm/cli.py).

    batchllm validate jobs/demo.yaml
    batchllm plan jobs/demo.yaml
    batchllm submit jobs/demo.yaml --set output.uri=./out/run2
    batchllm worker job.yaml --index 3            # container entrypoint
    batchllm status ./out/demo                    # or the job file

Exit codes: 0 complete, 1 failed, 2 usage or spec error (one line per problem, no traceback),
75 stopped early (SIGTERM/preemption; run again to resume).
"""
import functools
import logging
import os
import sys

import click

from batchllm.runner.spec import SpecError, load_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRY = 0, 1, 2, 75
log = logging.getLogger("batchllm.runner")

_job = click.argument("job", type=click.Path(dir_okay=False))
_sets = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a spec field, e.g. --set output.uri=s3://b/out/{{ ds }} (repeatable).")
_verbose = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and click's runner swap it)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _logging(verbose=False):
    root = logging.getLogger("batchllm")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _errors(fn):
    """Spec errors: one line each, exit 2. Storage errors: one line, exit 1. Anything else is a bug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            code = fn(*args, **kwargs)
        except SpecError as e:
            for line in str(e).splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(EXIT_USAGE)
        except OSError as e:
            click.echo(f"error: storage: {e}", err=True)
            sys.exit(EXIT_FAILED)
        except Exception as e:
            if not type(e).__module__.startswith(("botocore", "aiobotocore", "google")):
                raise
            click.echo(f"error: storage: {type(e).__name__}: {e}", err=True)  # e.g. no credentials
            sys.exit(EXIT_FAILED)
        sys.exit(code or 0)
    return wrapper


def _store_and_plan(spec):
    from batchllm.runner.plan import ensure_plan
    from batchllm.runner.storage import Store

    store = Store(spec.output.uri, spec.storage)
    return store, ensure_plan(spec, store)


def _summary(store, plan, spec):
    """The job's state judged by this spec's max_error_ratio and price (they may differ from the manifest's)."""
    from batchllm.runner.checkpoint import load_all
    from batchllm.runner.manifest import MANIFEST, summarize

    m = dict(store.read_json(MANIFEST) or {}, max_error_ratio=spec.max_error_ratio, gpu_hour_usd=spec.cost.gpu_hour_usd)
    return summarize(plan, load_all(store, plan), m)


@click.command()
@_job
@_sets
@_errors
def validate(job, overrides):
    """Check JOB (job.yaml) and print a one-line summary; exit 2 on any spec error."""
    spec = load_spec(job, overrides)
    fmt = spec.input.format
    click.echo(f"ok: {spec.name}: model {spec.model.source}, input {spec.input.uri} ({fmt}), "
               f"output {spec.output.uri}, {spec.compute.workers} worker(s) on {spec.compute.backend}")
    return EXIT_OK


@click.command()
@_job
@_sets
@_errors
def plan(job, overrides):
    """Show the shards of JOB: rows and estimated tokens per shard (reads the input, writes nothing)."""
    from batchllm.runner.plan import PLAN, format_table, make_plan
    from batchllm.runner.storage import Store

    spec = load_spec(job, overrides)
    stored = Store(spec.output.uri, spec.storage).read_json(PLAN)
    p = stored if stored and stored.get("fingerprint") == spec.fingerprint() else make_plan(spec)
    click.echo(f"{spec.name}: {p['files']} {p['format']} file(s), {p['total_rows']:,} rows, "
               f"{len(p['shards'])} shard(s) of <= {spec.compute.rows_per_shard:,} rows, "
               f"{spec.compute.workers} worker(s)")
    click.echo(format_table(p, spec.compute.workers))
    click.echo("(prompt tokens estimated at ~4 characters per token; generation bounded by sampling.max_tokens)")
    return EXIT_OK


@click.command()
@_job
@_sets
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the job and show progress (the local backend waits by default).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--dry-run", is_flag=True,
              help="Print what would be started (worker commands, Ray tasks, Kubernetes manifests) and exit.")
@_verbose
@_errors
def submit(job, overrides, wait, no_progress, dry_run, verbose):
    """Run JOB to completion: plan, start workers, wait. Resumes a stopped job; a finished job is left alone."""
    from batchllm.runner import backends

    _logging(verbose)
    spec = load_spec(job, overrides)
    backend = backends.get(spec.compute.backend)
    if dry_run:
        click.echo(backend.describe(spec, job, overrides))
        return EXIT_OK
    backend.check(spec, wait)
    store, p = _store_and_plan(spec)
    s = _summary(store, p, spec)
    if s["shards_complete"] == s["shards"]:
        click.echo(f"{spec.name}: already {s['state']} at {spec.output.uri} ({s['num_ok']:,} ok, "
                   f"{s['num_error']:,} errors); nothing to do")
        return EXIT_OK if s["state"] == "complete" else EXIT_FAILED
    if s["rows_done"]:
        click.echo(f"{spec.name}: resuming; {s['rows_done']:,}/{s['total_rows']:,} rows already committed", err=True)
    from batchllm.runner.manifest import format_summary, start_manifest

    start_manifest(store, spec, p)
    code = backend.run(spec, job, overrides, wait=wait, initial=s["rows_done"], total=s["total_rows"],
                       show_progress=not no_progress)
    if not wait:
        if code == EXIT_OK:
            click.echo(f"{spec.name}: started; follow with `batchllm status {spec.output.uri}`")
        return code
    s = _summary(store, p, spec)
    click.echo(format_summary(s, spec.output.uri))
    if s["shards_complete"] == s["shards"]:
        return EXIT_OK if s["state"] == "complete" else EXIT_FAILED
    if code == EXIT_RETRY:
        click.echo(f"{spec.name}: not finished; run the same command again to resume (or to follow it)", err=True)
    return code if code != EXIT_OK else EXIT_RETRY


@click.command()
@_job
@_sets
@click.option("--index", type=int, default=None,
              help="Worker index (default: JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, "
                   "CLOUD_RUN_TASK_INDEX or SLURM_ARRAY_TASK_ID; 0 for one worker).")
@_verbose
@_errors
def worker(job, overrides, index, verbose):
    """Run one worker of JOB: its shards, resumed from their checkpoints (the container entrypoint)."""
    from batchllm.runner.backends.local import PROGRESS_ENV, progress_printer
    from batchllm.runner.worker import run_worker

    _logging(verbose)
    spec = load_spec(job, overrides)
    progress = progress_printer() if os.environ.get(PROGRESS_ENV) == "1" else None
    try:
        return run_worker(spec, index, progress=progress)
    except SpecError:
        raise
    except Exception:
        log.exception("worker failed")
        return EXIT_FAILED


@click.command()
@click.argument("target")
@_sets
@_errors
def status(target, overrides):
    """Progress, tokens, throughput, GPU-hours and estimated cost of a job (TARGET: job.yaml or OUTPUT_URI).

    Exit code: 0 complete, 1 failed, 75 still running (or stopped), 2 no job there.
    """
    from batchllm.runner.checkpoint import load_all
    from batchllm.runner.manifest import MANIFEST, format_summary, summarize
    from batchllm.runner.plan import PLAN
    from batchllm.runner.storage import Store

    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        spec = load_spec(target, overrides)
        store, uri = Store(spec.output.uri, spec.storage), spec.output.uri
    else:
        uri = target if "://" in target else os.path.abspath(target)
        store = Store(uri)
    p = store.read_json(PLAN)
    if p is None:
        raise SpecError(f"{target}: no job there (no {uri.rstrip('/')}/{PLAN}); give a job file or an output URI")
    s = summarize(p, load_all(store, p), store.read_json(MANIFEST))
    click.echo(format_summary(s, uri))
    return {"complete": EXIT_OK, "failed": EXIT_FAILED}.get(s["state"], EXIT_RETRY)
