"""Which attempt of each stage a run uses, and what state it is in — computed before any work.

A stage's attempt is named after its fingerprint (pipeline/layout.py), so planning is a pure
function of the spec plus one listing per stage (to find ``t2i rerun``'s numbered attempts).
"""
from __future__ import annotations

import time

import yaml

from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.context import StageFailed
from pipeline.run.graph import deps_in_spec, enabled_stages
from pipeline.run.lease import describe_owner, is_expired, read_lease
from pipeline.run.spec import parse_spec, run_uri
from pipeline.run.stage_exec import ERROR_FILE, PlannedStage


def plan_stages(spec, fresh: set[str] | frozenset[str] = frozenset()) -> dict[str, PlannedStage]:
    """A PlannedStage for every enabled stage, in topological order. Stages in ``fresh`` get a
    new attempt (``t2i rerun``) instead of continuing their newest one."""
    ruri = run_uri(spec)
    plans: dict[str, PlannedStage] = {}
    for s in enabled_stages(spec):
        cfg = getattr(spec, s.name)
        input_ids = {d: plans[d].output_id for d in deps_in_spec(s, spec)}
        fp = mf.fingerprint(s.name, cfg, input_ids, s.code_version)
        if s.name in fresh:
            attempt = layout.next_attempt_uri(ruri, s.name, fp)
        else:
            attempt = layout.current_attempt_uri(ruri, s.name, fp)
        ext = mf.extent(cfg)
        name = attempt.rstrip("/").rsplit("/", 1)[-1]
        plans[s.name] = PlannedStage(s.name, fp, attempt, ext, mf.output_id(name, ext), input_ids)
    return plans


def load_run_spec(run: str):
    """The spec a run was last started with (saved at <run>/spec.yaml)."""
    uri = layout.run_spec_uri(run)
    if not store.exists(uri):
        raise StageFailed(f"{run} is not a run: {uri} does not exist")
    return parse_spec(yaml.safe_load(store.read_bytes(uri)), uri)


def stage_uri(run: str, stage: str) -> str:
    """The attempt folder the run's saved spec uses for ``stage`` (it may not exist yet)."""
    spec = load_run_spec(run)
    plans = plan_stages(spec)
    if stage not in plans:
        raise StageFailed(f"stage {stage} is not configured in {run}'s spec")
    return plans[stage].attempt_uri


def finished_attempt(run: str, stage: str) -> str:
    """The finished attempt a tool should read for ``stage``: the one the run's spec uses when it
    is done, else the one the stage last finished (``_CURRENT.json``)."""
    try:
        uri = stage_uri(run, stage)
        if mf.read_manifest(uri) is not None:
            return uri
    except StageFailed:
        pass
    uri = layout.read_current(run, stage)
    if uri is None or mf.read_manifest(uri) is None:
        raise StageFailed(f"{run} has no finished {stage} stage; run it first (t2i resume {run})")
    return uri


def _size(uri: str, manifest: dict | None) -> int:
    if manifest and manifest.get("total_bytes") is not None:
        return int(manifest["total_bytes"])
    fs, path = store.fs_and_path(uri)
    try:
        return int(fs.du(path, total=True))
    except (FileNotFoundError, OSError):
        return 0


def describe_attempt(uri: str) -> dict:
    """Size, age and state of an attempt folder, for ``t2i status`` and ``t2i gc``."""
    m = mf.read_manifest(uri)
    started = mf.read_started(uri)
    when = (m or {}).get("finished_at") or (started or {}).get("started_at")
    return {"attempt": uri.rstrip("/").rsplit("/", 1)[-1], "uri": uri, "state": "done" if m else "partial",
            "bytes": _size(uri, m), "age_s": round(time.time() - when, 1) if when else None,
            "steps": ((m or {}).get("extent") or {}).get("steps")}


def _lease_row(attempt_uri: str) -> dict | None:
    """Who is working on an unfinished attempt (its lease), for `t2i status`."""
    lease = read_lease(attempt_uri)
    if lease is None:
        return None
    return {"owner": lease.get("owner"), "heartbeat_age_s": round(time.time() - float(lease.get("heartbeat", 0)), 1),
            "expired": is_expired(lease), "held_by": describe_owner(lease)}


def run_status(run: str) -> list[dict]:
    """One row per enabled stage: its current attempt's state, plus the superseded attempts."""
    spec = load_run_spec(run)
    plans = plan_stages(spec)
    rows = []
    for s in enabled_stages(spec):
        p = plans[s.name]
        st = mf.stage_state(p.attempt_uri, p.fingerprint, p.extent)
        err = None
        if st.state != "done" and store.exists(store.join(p.attempt_uri, ERROR_FILE)):
            err = store.read_json(store.join(p.attempt_uri, ERROR_FILE)).get("error")
        m = st.manifest or {}
        state = "failed" if err else {"short": "extend"}.get(st.state, st.state)
        current = p.attempt_uri.rstrip("/").rsplit("/", 1)[-1]
        superseded = [describe_attempt(uri) for name, uri in layout.list_attempts(run, s.name) if name != current]
        rows.append({"stage": s.name, "state": state, "fingerprint": p.fingerprint[:12], "attempt": current,
                     "uri": p.attempt_uri, "counts": m.get("counts", {}), "metrics": m.get("metrics", {}),
                     "extent": m.get("extent", {}), "wanted": p.extent, "duration_s": m.get("duration_s"),
                     "node": (m.get("node") or {}).get("node_ip") or (m.get("node") or {}).get("hostname"),
                     "error": err, "superseded": superseded,
                     "lease": _lease_row(p.attempt_uri) if st.state != "done" else None})
    return rows
