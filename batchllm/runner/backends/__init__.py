"""Backends start a job's workers; each is a module with the same two functions.

    check(spec, wait)                            # refusals (SpecError) due before the plan is stored
    run(spec, job_path, overrides, wait, initial, total, show_progress) -> exit code (0, 1, 75)
    describe(spec, job_path, overrides) -> str   # what run would start (`batchllm submit --dry-run`)

Every worker is the same `batchllm worker` over the same plan, so backends differ only in where it runs.
"""
import importlib

BACKENDS = ("local", "ray", "kubernetes")


def get(name: str):
    """The backend module for compute.backend `name` (imported on use: ray and kubectl are optional)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    return importlib.import_module(f"batchllm.runner.backends.{name}")
