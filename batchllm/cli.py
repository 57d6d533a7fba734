"""The `batchllm` command line: a click group whose subcommands live next to what they drive.

    batchllm submit job.yaml        run a batch job (runner/cli.py)
    batchllm models pull NAME       fetch a model into the cache (models/cli.py)
    batchllm generate -m MODEL ...  a few prompts through the engine (engine_cli.py)
    batchllm bench throughput ...   the throughput benchmark (bench.py)
"""
import importlib
import sys

import click

# name -> "module:attribute"; imported only when that command runs, so `--help` stays fast.
_COMMANDS = {
    "validate": "batchllm.runner.cli:validate",
    "plan": "batchllm.runner.cli:plan",
    "submit": "batchllm.runner.cli:submit",
    "worker": "batchllm.runner.cli:worker",
    "status": "batchllm.runner.cli:status",
    "models": "batchllm.models.cli:models",
    "generate": "batchllm.engine_cli:generate",
    "bench": "batchllm.bench:bench",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # a part not built yet, or a missing extra
            return click.Command(name, help=f"(unavailable: {e})", callback=lambda err=e: _unavailable(name, err))


def _unavailable(name, err):
    click.echo(f"error: `batchllm {name}` is unavailable: {err}", err=True)
    sys.exit(2)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchllm")
def main():
    """batchllm: batch LLM inference from job.yaml to results."""


if __name__ == "__main__":
    main()
