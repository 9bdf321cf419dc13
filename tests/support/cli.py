"""``t2i`` as a user runs it: a fresh interpreter (``python -m pipeline.cli``), offline."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CliResult:
    """What a ``t2i`` subprocess did; unpacks as ``code, stdout, stderr``."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    def __iter__(self):
        return iter((self.code, self.stdout, self.stderr))

    @property
    def output(self) -> str:
        """stdout then stderr."""
        return self.stdout + self.stderr


def t2i(*args: str | Path, cwd: str | Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 500) -> CliResult:
    """Run ``t2i ARGS`` in a subprocess in ``cwd``; ``env`` adds to this process's environment
    (with HF_HUB_OFFLINE=1)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr, time.time() - t0)
