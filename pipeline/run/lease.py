"""One driver per stage attempt: a lease object in the store, taken atomically, kept alive by
heartbeats, released when the driver is done with the attempt.

``<attempt>/_LEASE.json`` holds the owner (host, pid, Ray job id when the driver runs as a Ray
job), when it was taken, a token, and a heartbeat time. Taking it is an atomic create on every
scheme (:func:`pipeline.store.create_exclusive`: a hard link on ``file://``, ``If-None-Match: *``
on ``s3://``, ``ifGenerationMatch=0`` on ``gs://``), so of two drivers exactly one gets it.

A driver leases every attempt it is about to work on when it starts (not when each stage
starts), so a second driver of the same run finds them all held and leaves them alone, instead
of starting on the ones the first has not reached yet. A background thread rewrites each held
lease every ``interval`` seconds (30 s); a lease whose heartbeat is older than ``EXPIRE_BEATS``
intervals (2 minutes) belongs to a driver that died (SIGKILL, lost node) and is taken over, and
the takeover is logged and recorded in the attempt's manifest; so is, at once, a lease whose
owner ran on this very host and whose process is gone (a killed driver, then `t2i resume`). Four beats: one or two can be
late without anyone being dead (a store retrying with backoff, a stalled VM), and a dead
driver's stages are picked up within two minutes, short against stages that train for days.
The heartbeat time is the writer's clock: clocks that differ by more than a minute shorten or
lengthen that grace. A takeover is delete-then-create; two takers racing for one expired lease
could both think they won, so each heartbeat first checks the token: a driver whose lease now
carries another token has lost it and stops working on that attempt at once.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from pipeline import layout, store

INTERVAL_S = float(os.environ.get("T2I_LEASE_INTERVAL_S", "30"))  # tests shorten it
EXPIRE_BEATS = 4


def lease_uri(attempt_uri: str) -> str:
    return store.join(attempt_uri, layout.LEASE)


def owner_info() -> dict:
    """Who this driver is: host, pid and, inside a Ray job, its submission id."""
    out = {"host": socket.gethostname(), "pid": os.getpid()}
    job = os.environ.get("T2I_JOB_ID")  # set by `t2i submit` in the job driver's environment
    if job:
        out["ray_job"] = job
    return out


def describe_owner(lease: dict) -> str:
    o = lease.get("owner") or {}
    job = f", Ray job {o['ray_job']}" if o.get("ray_job") else ""
    age = time.time() - float(lease.get("heartbeat", 0))
    return f"pid {o.get('pid')} on {o.get('host')}{job} (since {time.strftime('%H:%M:%S', time.localtime(lease.get('started', 0)))}, last heartbeat {age:.0f}s ago)"


def read_lease(attempt_uri: str) -> dict | None:
    try:
        return store.read_json(lease_uri(attempt_uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_expired(lease: dict, interval: float = INTERVAL_S, now: float | None = None) -> bool:
    return (now if now is not None else time.time()) - float(lease.get("heartbeat", 0)) > EXPIRE_BEATS * interval


def owner_gone(lease: dict) -> bool:
    """The owner ran on this host and its process no longer exists (a SIGKILLed driver, then
    `t2i resume` on the same machine): no need to wait for its lease to expire."""
    o = lease.get("owner") or {}
    if o.get("host") != socket.gethostname() or not isinstance(o.get("pid"), int):
        return False
    try:
        os.kill(o["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, another user's
    return False


class LeaseHeld(Exception):
    """Another live driver holds the attempt's lease."""

    def __init__(self, stage: str, lease: dict):
        super().__init__(f"{stage} is being worked on by {describe_owner(lease)}")
        self.stage, self.lease = stage, lease


@dataclass
class _Held:
    stage: str
    attempt_uri: str
    doc: dict
    took_over_from: dict | None = None
    lost: bool = False


@dataclass
class LeaseKeeper:
    """This driver's leases (see the module doc). ``acquire`` before working on an attempt,
    ``release`` when done with it; ``close`` releases the rest (also on Ctrl-C, via ``finally``)."""

    interval: float = INTERVAL_S
    log: Callable[[str], None] = print
    held: dict[str, _Held] = field(default_factory=dict)  # attempt URI -> lease

    def __post_init__(self):
        self.owner = owner_info()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def acquire(self, stage: str, attempt_uri: str, *, take_over: bool = False) -> None:
        """Take the attempt's lease, or raise :class:`LeaseHeld` naming its live owner.
        An expired lease (or any, with ``take_over``) is taken over and the takeover logged."""
        if attempt_uri in self.held:
            return
        now = time.time()
        doc = {"owner": self.owner, "stage": stage, "token": uuid.uuid4().hex, "started": now, "heartbeat": now}
        previous = None
        for _ in range(3):
            if store.create_exclusive(lease_uri(attempt_uri), json.dumps(doc).encode()):
                break
            current = read_lease(attempt_uri)
            if current is None:
                continue  # released between our create and our read: try again
            expired, gone = is_expired(current, self.interval), owner_gone(current)
            if not (take_over or expired or gone):
                raise LeaseHeld(stage, current)
            previous = current
            why = " (expired)" if expired else " (its process is gone)" if gone else " (--take-over)"
            self.log(f"! {stage}: taking over the lease of {describe_owner(current)}{why}")
            store.remove(lease_uri(attempt_uri), recursive=False)
        else:
            raise LeaseHeld(stage, read_lease(attempt_uri) or {"owner": {"host": "?", "pid": "?"}})
        with self._lock:
            self.held[attempt_uri] = _Held(stage, attempt_uri, doc, previous)
        self._start()

    def takeover_record(self, attempt_uri: str) -> dict:
        """What the manifest records about who worked on the attempt."""
        h = self.held.get(attempt_uri)
        if h is None:
            return {}
        out = {"owner": h.doc["owner"], "token": h.doc["token"]}
        if h.took_over_from:
            out["took_over_from"] = h.took_over_from.get("owner")
        return out

    def check(self, attempt_uri: str) -> None:
        """Raise if this driver lost the attempt's lease (another driver took it over)."""
        h = self.held.get(attempt_uri)
        if h is not None and h.lost:
            raise RuntimeError(f"{h.stage}: lost its lease to another driver; stopped working on it")

    def release(self, attempt_uri: str) -> None:
        with self._lock:
            h = self.held.pop(attempt_uri, None)
        if h is None or h.lost:
            return
        current = read_lease(attempt_uri)
        if current is not None and current.get("token") == h.doc["token"]:
            store.remove(lease_uri(attempt_uri), recursive=False)

    def close(self) -> None:
        self._stop.set()
        for uri in list(self.held):
            try:
                self.release(uri)
            except Exception as e:  # noqa: BLE001 - the others still go; an unreleased lease expires
                self.log(f"! could not release the lease of {uri}: {e}")

    # -- heartbeats ---------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="t2i-lease-heartbeat")
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                held = list(self.held.values())
            for h in held:
                try:
                    current = read_lease(h.attempt_uri)
                    if current is None or current.get("token") != h.doc["token"]:
                        h.lost = True
                        self.log(f"! {h.stage}: lease lost to "
                                 f"{describe_owner(current) if current else 'nobody (it was removed)'}")
                        continue
                    h.doc["heartbeat"] = time.time()
                    store.write_json(lease_uri(h.attempt_uri), h.doc)
                except Exception as e:  # noqa: BLE001 - a missed beat is not fatal: the next one retries
                    self.log(f"! {h.stage}: lease heartbeat failed ({e}); retrying in {self.interval:.0f}s")


@contextmanager
def leased(what: str, uri: str, *, log: Callable[[str], None] = print, take_over: bool = False):
    """Hold the lease of one output folder while a command writes it (``t2i embed``, ``t2i eval``):
    raises :class:`LeaseHeld` if another live driver holds it; released on the way out."""
    keeper = LeaseKeeper(log=log)
    try:
        keeper.acquire(what, uri, take_over=take_over)
        yield keeper
    finally:
        keeper.close()
