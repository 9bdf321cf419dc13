"""Stage manifests and fingerprints: "a stage is done iff its manifest exists" (DESIGN inv. 4).

Layout of a stage directory ``<run>/<stage>/``:

* ``_STARTED.json``  written when the stage starts: its fingerprint. A later run with the same
  fingerprint resumes in place (keeping finished shards and checkpoints); a different one
  clears the directory first.
* ``_MANIFEST.json`` written *last*, atomically: fingerprint, outputs with sizes, counts,
  metrics, times, where it ran. Its presence with a matching fingerprint is the only thing that
  makes a stage "done".
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline import store

MANIFEST = "_MANIFEST.json"
STARTED = "_STARTED.json"


def code_version() -> str:
    try:
        return version("t2i-pipeline")
    except PackageNotFoundError:
        return "dev"


def config_for_fingerprint(cfg) -> dict:
    """The part of a stage config that changes its outputs.

    Config classes may list fields that only change *how* the work is scheduled (process
    counts, actors, resources) in ``fingerprint_exclude``; changing those must not re-run a
    finished stage.
    """
    exclude = set(getattr(type(cfg), "fingerprint_exclude", ()) or ())
    return cfg.model_dump(mode="json", exclude=exclude)


def fingerprint(stage_name: str, cfg, input_manifests: dict[str, dict], stage_code_version: str = "1") -> str:
    # Values left at their defaults are not hashed: a release that adds a config field (with a
    # default that keeps today's behaviour) must not invalidate every finished stage of every
    # run. A change of behaviour bumps the stage's code_version instead (pipeline/graph.py).
    exclude = set(getattr(type(cfg), "fingerprint_exclude", ()) or ())
    payload = {
        "stage": stage_name,
        "config": cfg.model_dump(mode="json", exclude=exclude, exclude_defaults=True),
        "inputs": {k: m["fingerprint"] for k, m in sorted(input_manifests.items())},
        "code": f"{code_version()}/{stage_code_version}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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
    state: str            # done | partial | stale | pending
    manifest: dict | None
    started: dict | None


def stage_state(stage_uri: str, fp: str | None) -> StageState:
    m = read_manifest(stage_uri)
    s = read_started(stage_uri)
    if m is not None and (fp is None or m.get("fingerprint") == fp):
        return StageState("done", m, s)
    if m is not None:
        return StageState("stale", m, s)
    if s is not None:
        return StageState("partial" if fp is None or s.get("fingerprint") == fp else "stale", None, s)
    return StageState("pending", None, None)


def mark_started(stage_uri: str, fp: str) -> None:
    store.write_json(store.join(stage_uri, STARTED), {"fingerprint": fp, "started_at": time.time(),
                                                       "host": socket.gethostname()})


def list_outputs(stage_uri: str, limit: int = 2000) -> tuple[list[dict], int]:
    """Files under a stage dir with sizes (capped, so a 100k-shard stage keeps a small manifest)."""
    fs, path = store.fs_and_path(stage_uri)
    files = fs.find(path, detail=True)
    total = 0
    out = []
    for p, info in sorted(files.items()):
        name = p[len(path.rstrip("/")) + 1:]
        if name in (MANIFEST, STARTED) or "/.tmp-" in "/" + name:
            continue
        sz = int(info.get("size") or 0)
        total += sz
        if len(out) < limit:
            out.append({"path": name, "bytes": sz})
    return out, total


def write_manifest(stage_uri: str, *, stage: str, fp: str, started_at: float, counts: dict[str, Any],
                   metrics: dict[str, Any], outputs: dict[str, str], node: dict[str, Any],
                   config: dict) -> dict:
    files, total = list_outputs(stage_uri)
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "out_uri": stage_uri,
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
    store.write_json(manifest_uri(stage_uri), manifest)
    return manifest
