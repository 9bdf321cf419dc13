"""What the driver shows while stages run: their messages once each, and one live line per
running stage (step/total, loss, samples/s, ETA, last checkpoint), read from the progress files
the stages write to the store (pipeline/progress.py) — so it works the same for stages in this
process, in Ray tasks on other nodes, or in Ray Train workers.

On a terminal the live lines are a rich Live region; elsewhere (a pipe, CI, a log file) each
running stage's line is printed when it changed and at most every ``plain_every_s`` seconds.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from pipeline.progress import PROGRESS, TRAIN_PROGRESS, describe, read_progress


class ProgressConsole:
    def __init__(self, log: Callable[[str], None], *, live_console=None, poll_s: float = 1.0,
                 plain_every_s: float = 30.0):
        self.log, self.live_console = log, live_console
        self.poll_s, self.plain_every_s = poll_s, plain_every_s
        self.running: dict[str, tuple[str, float]] = {}  # stage -> (attempt uri, start time)
        self.seen: dict[tuple[str, str], int] = {}
        self.lines: dict[str, str] = {}
        self.printed: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None

    def __enter__(self) -> "ProgressConsole":
        if self.live_console is not None and self.live_console.is_terminal:
            from rich.live import Live

            self._live = Live("", console=self.live_console, refresh_per_second=2, transient=True)
            self._live.start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress-console")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll_once()  # the last messages of stages that just finished
        if self._live is not None:
            self._live.stop()

    def started(self, stage: str, attempt_uri: str) -> None:
        with self._lock:
            self.running[stage] = (attempt_uri, time.time())

    def finished(self, stage: str) -> None:
        self._poll_stage(stage)
        with self._lock:
            self.running.pop(stage, None)
            self.lines.pop(stage, None)
        self._render()

    def say(self, text: str) -> None:
        """A line from the driver itself (above the live region on a terminal)."""
        if self._live is not None:
            self._live.console.print(text)
        else:
            self.log(text)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll_once()

    def poll_once(self) -> None:
        with self._lock:
            stages = list(self.running)
        for stage in stages:
            self._poll_stage(stage)
        self._render()

    def _poll_stage(self, stage: str) -> None:
        with self._lock:
            entry = self.running.get(stage)
        if entry is None:
            return
        attempt, t0 = entry
        fields: dict = {}
        for name in (PROGRESS, TRAIN_PROGRESS):
            doc = read_progress(attempt, name)
            if not doc:
                continue
            fields.update(doc.get("fields") or {})
            last = self.seen.get((stage, name), 0)
            for seq, text in doc.get("messages") or []:
                if seq > last:
                    self.say(f"  {stage} · {text}")
                    last = seq
            self.seen[(stage, name)] = last
        line = describe(fields)
        with self._lock:
            if stage in self.running:
                self.lines[stage] = f"{stage}: {line or 'running'} ({int(time.time() - t0)}s)"

    def _render(self) -> None:
        with self._lock:
            lines = dict(self.lines)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(f"▶ {v}" for v in lines.values())))
            return
        now = time.time()
        for stage, line in lines.items():
            body = line.rsplit(" (", 1)[0]
            prev = self.printed.get(stage)
            if body.endswith(": running"):
                continue
            if prev is None or (prev[0] != body and now - prev[1] >= self.plain_every_s):
                self.log(f"▶ {line}")
                self.printed[stage] = (body, now)
