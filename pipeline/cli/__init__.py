"""The ``t2i`` command line (``python -m pipeline.cli`` works too).

Each module holds one group of commands on a Typer of its own; this file puts them on one app,
so no module registers itself by being imported. :func:`main` is the console script: a user
mistake that surfaces as an exception prints one line (``--debug`` shows the traceback).
"""
from __future__ import annotations

import sys
from typing import Optional

import typer

from pipeline.cli import bench, evaluate, models, plan, runs, submit
from pipeline.cli.common import err_console
from pipeline.manifest import code_version

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT,
                  pretty_exceptions_enable=False,
                  help="Train unCLIP / Imagen text-to-image cascades on Ray + DeepSpeed.")
for group in (runs.app, models.app, submit.app, plan.app, evaluate.app):
    app.registered_commands.extend(group.registered_commands)
bench.bench_app.info.context_settings = CONTEXT
app.add_typer(bench.bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"t2i-pipeline {code_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (and Ray's own logs).")) -> None:
    """Train unCLIP / Imagen text-to-image cascades on Ray + DeepSpeed."""


# What a user's mistake raises when it gets past a command's own checks: said in one line.
_USER_ERRORS = ("StageFailed", "SpecError", "SubmitError", "FileNotFoundError", "KeyError", "ValueError",
                "PermissionError", "StoreError")


def main() -> None:  # pragma: no cover - exercised through the console script in tests
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        if debug or type(e).__name__ not in _USER_ERRORS:
            raise
        msg = str(e).strip("'\"") or type(e).__name__
        err_console.print(f"[bold red]error:[/] {msg}\n(run with --debug for the traceback)")
        sys.exit(2)
