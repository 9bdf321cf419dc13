"""Fault injection for the reliability tests: object-store writes that fail on cue.

Test code (tests/), not part of the package. :func:`failing_writes` swaps
``pipeline.store.fs_and_path`` for one that wraps the real filesystem, so every store write of
the pipeline (``write_bytes_atomic`` -> ``pipe_file``, checkpoint uploads -> ``put_file``,
streamed ``open(..., "wb")``) passes a :class:`WriteFaults` plan that decides which ones fail.
Reads are untouched. It works in this process only (Ray workers import their own store module),
and on object-store URIs (``s3://``): local ``file://`` atomic writes bypass fsspec.

Example: the 2nd..4th upload into a step_00000002 checkpoint fails like an unreachable endpoint::

    with failing_writes(WriteFaults(match="step_00000002/", first=2, times=3)) as plan:
        ...
    assert plan.injected == 3
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pipeline import store


@dataclass
class WriteFaults:
    """Which writes fail: the ``first``-th matching write (1-based) and the ``times - 1`` after it.

    ``match``: a regular expression searched in the written path. ``times=None``: fail forever
    (an endpoint that stays down). ``error``: the exception to raise, given the path.
    """

    match: str = ".*"
    first: int = 1
    times: int | None = 1
    error: Callable[[str], Exception] = lambda path: ConnectionError(
        f"injected fault: connection to the object store lost while writing {path}")
    seen: int = 0
    injected: int = 0
    failed_paths: list[str] = field(default_factory=list)

    def check(self, path: str) -> None:
        if not re.search(self.match, path):
            return
        self.seen += 1
        last = None if self.times is None else self.first + self.times - 1
        if self.seen >= self.first and (last is None or self.seen <= last):
            self.injected += 1
            self.failed_paths.append(path)
            raise self.error(path)


class FaultyFS:
    """A filesystem proxy: writes consult the plan first; everything else goes to ``fs``."""

    def __init__(self, fs, plan: WriteFaults):
        self._fs, self._plan = fs, plan

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def pipe_file(self, path, value, *args, **kwargs):
        self._plan.check(path)
        return self._fs.pipe_file(path, value, *args, **kwargs)

    def put_file(self, lpath, rpath, *args, **kwargs):
        self._plan.check(rpath)
        return self._fs.put_file(lpath, rpath, *args, **kwargs)

    def open(self, path, mode="rb", *args, **kwargs):
        if any(c in mode for c in "wax"):
            self._plan.check(path)
        return self._fs.open(path, mode, *args, **kwargs)


@contextlib.contextmanager
def failing_writes(plan: WriteFaults) -> Iterator[WriteFaults]:
    """Within the block, store writes in this process go through ``plan`` (see module doc)."""
    real = store.fs_and_path

    def faulty(uri: str):
        fs, path = real(uri)
        return FaultyFS(fs, plan), path

    store.fs_and_path = faulty
    try:
        yield plan
    finally:
        store.fs_and_path = real
