"""What every command shares: the consoles, the one way to fail, and how a run is named."""
from __future__ import annotations

import os
from typing import List, Optional

import typer
from rich.console import Console

from pipeline.store import normalize

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    """One clear line for a user mistake, no traceback."""
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def resolve_run(run: str) -> str:
    """A run URI, a local path, or a bare run id under the default store (./runs)."""
    if "://" in run or os.sep in run or os.path.exists(run):
        return normalize(run)
    return normalize(os.path.join("runs", run))


def load_spec_or_fail(spec_path: Optional[str], overrides: List[str]):
    from pipeline.run.spec import SpecError, load_spec, parse_override  # speed: not for t2i --help (yaml, spec)

    try:
        return load_spec(spec_path, dict(parse_override(o) for o in overrides))
    except SpecError as e:
        fail(str(e))
