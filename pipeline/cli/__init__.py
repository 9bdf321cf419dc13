"""The ``t2i`` command line (``python -m pipeline.cli`` works too).

Each module holds one group of commands on a Typer of its own; this file puts them on one app,
so no module registers itself by being imported.
"""
from __future__ import annotations

import sys

import typer

from pipeline.cli import bench, models, runs, submit

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train unCLIP / Imagen text-to-image cascades on Ray + DeepSpeed.")
for group in (runs.app, models.app, submit.app):
    app.registered_commands.extend(group.registered_commands)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:  # pragma: no cover
    sys.exit(app())
