"""Stage manifests and fingerprints: an attempt is done iff its manifest exists (docs/design.md).

Layout of one attempt folder ``<run>/<stage>/<attempt>/`` (pipeline/layout.py):

* ``_STARTED.json``  written when the attempt starts: its fingerprint.
* ``_MANIFEST.json`` written *last*, atomically: fingerprint, extent (how far it trained),
  outputs with sizes, counts, metrics, times, where it ran. Its presence is the only thing that
  makes an attempt "done".

What a fingerprint covers. A config field belongs to one of three kinds, declared on the
config class:

* *identity* (the default): what the stage produces — network, data, diffusion, optimizer
  settings, seed. A change means different outputs: a new attempt beside the old one.
* ``fingerprint_exclude``: how the work is scheduled, logged or placed (process counts,
  cadences, W&B, resources). Never part of the fingerprint: a change re-runs nothing.
* ``extent_fields`` (also excluded): how far the work goes (``steps``). A finished attempt
  whose extent is short of the spec's is *continued in place* from its latest checkpoint.

The package version is not hashed: upgrading never invalidates a finished stage. A stage's
own ``code_version`` (pipeline/run/graph.py) is bumped only when its outputs change meaning.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline import layout, store

MANIFEST = layout.MANIFEST  # the names live in pipeline/layout.py; kept here for the modules that read them from here
STARTED = layout.STARTED


def code_version() -> str:
    """The installed package version (recorded in manifests for information; never hashed)."""
    try:
        return version("t2i-pipeline")
    except PackageNotFoundError:
        return "dev"


def _excluded(cfg) -> set[str]:
    kind = type(cfg)
    return set(getattr(kind, "fingerprint_exclude", ()) or ()) | set(getattr(kind, "extent_fields", ()) or ())


def config_for_fingerprint(cfg) -> dict:
    """The identity part of a stage config (what changes its outputs), with defaults."""
    return cfg.model_dump(mode="json", exclude=_excluded(cfg))


def extent(cfg) -> dict[str, int]:
    """How far a stage's work goes (``{"steps": 1000}`` for training; empty for the others)."""
    return {f: int(getattr(cfg, f)) for f in (getattr(type(cfg), "extent_fields", ()) or ())}


def fingerprint(stage_name: str, cfg, input_ids: dict[str, str], stage_code_version: str = "1") -> str:
    """Hash of the stage's identity config, its inputs' output ids and its code version.

    Values left at their defaults are not hashed: a release that adds a config field (with a
    default that keeps today's behaviour) must not invalidate every finished stage of every run.
    """
    payload = {
        "stage": stage_name,
        "config": cfg.model_dump(mode="json", exclude=_excluded(cfg), exclude_defaults=True),
        "inputs": dict(sorted(input_ids.items())),
        "code": stage_code_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def output_id(attempt_name: str, ext: dict[str, int]) -> str:
    """What downstream fingerprints hash: which attempt, trained how far. Extending a training
    stage (or re-running it as a new attempt) changes it, so sampling re-runs; the stage's own
    fingerprint stays, so its checkpoints are continued."""
    return hashlib.sha256(json.dumps({"attempt": attempt_name, "extent": ext}, sort_keys=True).encode()).hexdigest()


def manifest_uri(stage_uri: str) -> str:
    return store.join(stage_uri, MANIFEST)


def read_manifest(stage_uri: str) -> dict | None:
    uri = manifest_uri(stage_uri)
    if not store.exists(uri):
        return None
    try:
        return store.read_json(uri)
    except (ValueError, store.StoreError):
        return None  # an unreadable manifest is not a finished stage


def read_started(stage_uri: str) -> dict | None:
    uri = store.join(stage_uri, STARTED)
    if not store.exists(uri):
        return None
    try:
        return store.read_json(uri)
    except (ValueError, store.StoreError):
        return None


@dataclass
class StageState:
    state: str            # done | short | partial | pending  (short: done, but to a smaller extent)
    manifest: dict | None
    started: dict | None


def covers(done_extent: dict | None, wanted: dict[str, int]) -> bool:
    """Whether work finished to ``done_extent`` already reaches ``wanted`` (e.g. steps >= steps)."""
    done_extent = done_extent or {}
    return all(int(done_extent.get(k, -1)) >= v for k, v in wanted.items())


def stage_state(attempt_uri: str, fp: str | None, wanted: dict[str, int] | None = None) -> StageState:
    """The state of one attempt for the fingerprint ``fp`` (None: any) and extent ``wanted``.

    A manifest of another fingerprint in this folder (an attempt folder is named after its
    fingerprint, so only a hand-made folder has one) never counts as done.
    """
    m = read_manifest(attempt_uri)
    s = read_started(attempt_uri)
    if m is not None and (fp is None or m.get("fingerprint") == fp):
        return StageState("done" if covers(m.get("extent"), wanted or {}) else "short", m, s)
    if s is not None and (fp is None or s.get("fingerprint") == fp):
        return StageState("partial", m, s)
    return StageState("pending", None, None)


def mark_started(stage_uri: str, fp: str) -> None:
    store.write_json(store.join(stage_uri, STARTED), {"fingerprint": fp, "started_at": time.time(),
                                                       "host": socket.gethostname()})


def list_outputs(stage_uri: str, limit: int = 2000) -> tuple[list[dict], int]:
    """Files under a stage dir with sizes (capped, so a 100k-shard stage keeps a small manifest)."""
    fs, path = store.fs_and_path(stage_uri)
    total = 0
    out = []
    for name, sz in sorted(_walk_sizes(stage_uri, fs, path)):
        if name in (MANIFEST, STARTED, layout.LEASE) or "/.tmp-" in "/" + name:
            continue
        total += sz
        if len(out) < limit:
            out.append({"path": name, "bytes": sz})
    return out, total


def _walk_sizes(stage_uri: str, fs, path: str) -> list[tuple[str, int]]:
    """(path relative to the stage dir, size) of every file under it: one recursive listing. A
    local folder is walked with os.scandir (fsspec's find stats and re-parses every entry in
    Python, ~2 s for 40,000 files)."""
    root = path.rstrip("/")
    local = store.local_path(stage_uri)
    if local is None:
        return [(p[len(root) + 1:], int(info.get("size") or 0)) for p, info in fs.find(path, detail=True).items()]
    out, stack = [], [local.rstrip("/")]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        out.append((e.path[len(local.rstrip("/")) + 1:], e.stat().st_size))
        except FileNotFoundError:
            continue
    return out


def write_manifest(stage_uri: str, *, stage: str, fp: str, started_at: float, counts: dict[str, Any],
                   metrics: dict[str, Any], outputs: dict[str, str], node: dict[str, Any],
                   config: dict, extent: dict[str, int] | None = None, output_id: str | None = None,
                   inputs: dict[str, str] | None = None, lease: dict | None = None) -> dict:
    files, total = list_outputs(stage_uri)
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "attempt": stage_uri.rstrip("/").rsplit("/", 1)[-1],
        "out_uri": stage_uri,
        "extent": extent or {},
        "output_id": output_id,
        "inputs": inputs or {},
        "code_version": code_version(),
        "config": config,
        "counts": counts,
        "metrics": metrics,
        "outputs": outputs,
        "files": files,
        "total_bytes": total,
        "started_at": started_at,
        "finished_at": time.time(),
        "duration_s": round(time.time() - started_at, 3),
        "node": node,
    }
    if lease:  # the driver that held the attempt's lease (pipeline/run/lease.py); a takeover is counted
        manifest["lease"] = lease
        if lease.get("took_over_from"):  # another driver had worked on it and stopped beating
            counts["lease_takeovers"] = 1
    store.write_json(manifest_uri(stage_uri), manifest)
    return manifest
