"""A running stage's progress, through the store: ``<attempt>/_PROGRESS.json``.

Stages run in Ray tasks, Ray Train workers, img2dataset children or this process; all of them
can write to the store, and the driver can read it wherever it runs (also for a submitted job,
`t2i status`). So a stage reports through one small JSON file instead of its stdout:

* ``message(text)``: a status line (kept: the last 50, numbered, so the driver prints each once);
* ``update(**fields)``: the live figures (``step``, ``total``, ``loss``, ``samples_per_s``,
  ``eta_s``, ``last_checkpoint``; ``done``/``total`` shards and ``rows_per_s`` for data stages).

Writes are throttled (one per ``every_s`` at most, plus :meth:`flush`), so a stage that logs
every step costs one small PUT per second.
"""
from __future__ import annotations

import time
from typing import Any

from pipeline import layout, store

PROGRESS = layout.PROGRESS              # written by the stage's own process
TRAIN_PROGRESS = layout.TRAIN_PROGRESS  # written by rank 0 of its training loop (maybe another process)
KEEP_MESSAGES = 50


class StageProgress:
    def __init__(self, attempt_uri: str | None, *, every_s: float = 1.0, echo=None, name: str = PROGRESS):
        self.name = name
        self.uri = store.join(attempt_uri, name) if attempt_uri else None
        self.every_s = every_s
        self.echo = echo  # also print each message here (in-process runs without a driver poller)
        self.fields: dict[str, Any] = {}
        self.messages: list[tuple[int, str]] = []
        self.seq = 0
        self._last_write = 0.0
        if self.uri:
            old = read_progress(attempt_uri, name)  # a resumed attempt continues the numbering
            self.seq = int(old.get("seq", 0)) if old else 0

    def __call__(self, text: str) -> None:
        self.message(text)

    def message(self, text: str) -> None:
        self.seq += 1
        self.messages = (self.messages + [(self.seq, text)])[-KEEP_MESSAGES:]
        if self.echo is not None:
            self.echo(text)
        self._write(force=False)

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        self._write(force=False)

    def flush(self) -> None:
        self._write(force=True)

    def _write(self, force: bool) -> None:
        if not self.uri:
            return
        now = time.time()
        if not force and now - self._last_write < self.every_s:
            return
        self._last_write = now
        try:
            store.write_json(self.uri, {"seq": self.seq, "messages": self.messages, "fields": self.fields, "t": now})
        except Exception:  # noqa: BLE001 - progress is informative; it never fails a stage
            pass


def read_progress(attempt_uri: str, name: str = PROGRESS) -> dict | None:
    uri = store.join(attempt_uri, name)
    try:
        return store.read_json(uri) if store.exists(uri) else None
    except Exception:  # noqa: BLE001 - a half-visible or unreadable file is "no news"
        return None


def describe(fields: dict[str, Any]) -> str:
    """One line for a stage's live figures: step/total, loss, rate, ETA, last checkpoint."""
    parts = []
    if "step" in fields and "total" in fields:
        parts.append(f"step {fields['step']}/{fields['total']}")
    elif "done" in fields and "total" in fields:
        parts.append(f"{fields['done']}/{fields['total']} {fields.get('unit', 'shards')}")
    if fields.get("loss") is not None:
        parts.append(f"loss {fields['loss']:.4f}")
    if fields.get("samples_per_s"):
        parts.append(f"{fields['samples_per_s']:.1f} samples/s")
    if fields.get("rows_per_s"):
        parts.append(f"{fields['rows_per_s']:.1f} rows/s")
    if fields.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(fields['eta_s'])}")
    if fields.get("last_checkpoint") is not None:
        parts.append(f"ckpt {fields['last_checkpoint']}")
    return ", ".join(parts)


def format_duration(s: float) -> str:
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
