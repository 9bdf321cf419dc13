"""Executes a run spec's stage graph, on Ray or in this process.

Every stage is a plain function ``run(cfg, ctx)``; this module decides *whether* it runs
(fingerprints), *where* (a Ray task per stage, so independent training stages run side by side
when the cluster has room) and records the result (``_MANIFEST.json``, written by the stage's
own task so a dying driver never loses a finished stage).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import manifest as mf
from pipeline import store
from pipeline.context import StageContext, StageFailed
from pipeline.graph import StageDef, deps_in_spec, downstream, enabled_stages, get_stage
from pipeline.spec import parse_spec, run_uri, spec_to_yaml

ERROR_FILE = "_ERROR.json"


@dataclass
class StageOutcome:
    name: str
    status: str                     # ran | skipped | failed | blocked
    manifest: dict | None = None
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class RunSummary:
    run_uri: str
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.status in ("ran", "skipped") for o in self.outcomes.values())


def plan_fingerprints(spec) -> dict[str, str]:
    """Fingerprints for every enabled stage, computed up front (they depend on configs only)."""
    fps: dict[str, str] = {}
    for s in enabled_stages(spec):
        inputs = {d: {"fingerprint": fps[d]} for d in deps_in_spec(s, spec)}
        fps[s.name] = mf.fingerprint(s.name, getattr(spec, s.name), inputs, s.code_version)
    return fps


def _node_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - where it ran is informative, never fatal
        pass
    return info


def execute_stage(stage_name: str, spec_data: dict, inputs: dict[str, dict], fp: str,
                  ray_enabled: bool, progress: Callable[[str], None] | None = None) -> dict:
    """Run one stage to completion and write its manifest. Runs inside a Ray task or in-process."""
    spec = parse_spec(spec_data, "<run spec>")
    stage = get_stage(stage_name)
    ruri = run_uri(spec)
    out_uri = store.join(ruri, stage_name)
    state = mf.stage_state(out_uri, fp)
    if state.state == "done":
        return state.manifest
    if state.manifest is not None:
        store.remove(mf.manifest_uri(out_uri))  # stale: must stop looking done before anything else
    if state.state == "stale":
        store.remove(out_uri)  # outputs of another config: never mix them with this run's
    store.remove(store.join(out_uri, ERROR_FILE))
    mf.mark_started(out_uri, fp)
    cfg = getattr(spec, stage_name)
    ctx = StageContext(run_uri=ruri, out_uri=out_uri, inputs=inputs, spec=spec,
                       ray_enabled=ray_enabled, progress=progress or (lambda m: print(f"[{stage_name}] {m}", flush=True)))
    t0 = time.time()
    try:
        result = stage.load().run(cfg, ctx)
    except BaseException as e:
        _record_error(out_uri, e)
        raise
    return mf.write_manifest(out_uri, stage=stage_name, fp=fp, started_at=t0, counts=result.counts,
                             metrics=result.metrics, outputs=result.outputs, node=_node_info(),
                             config=mf.config_for_fingerprint(cfg))


def _record_error(out_uri: str, e: BaseException) -> None:
    try:
        store.write_json(store.join(out_uri, ERROR_FILE), {
            "error": f"{type(e).__name__}: {e}", "user_facing": isinstance(e, StageFailed),
            "traceback": traceback.format_exc(), "at": time.time()})
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def _error_message(e: BaseException) -> str:
    """The user-facing part of an error, unwrapping Ray's task error."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, StageFailed):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def reset_stages(spec, names: list[str]) -> None:
    """Forget finished stages so they run again: manifest first (never looks done), then outputs."""
    ruri = run_uri(spec)
    for name in names:
        uri = store.join(ruri, name)
        store.remove(mf.manifest_uri(uri))
        store.remove(uri)


def save_spec(spec) -> None:
    store.write_bytes_atomic(store.join(run_uri(spec), "spec.yaml"), spec_to_yaml(spec).encode())


def run_pipeline(spec, *, only: list[str] | None = None, force: list[str] | None = None,
                 address: str | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) the spec's stages. ``only`` limits the run to those stages (their
    dependencies must be done); ``force`` re-runs those stages from scratch."""
    ruri = run_uri(spec)
    save_spec(spec)
    if force:
        reset_stages(spec, force)
    fps = plan_fingerprints(spec)
    stages = [s for s in enabled_stages(spec) if only is None or s.name in only]
    summary = RunSummary(ruri)
    todo: list[StageDef] = []
    manifests: dict[str, dict] = {}
    for s in enabled_stages(spec):
        st = mf.stage_state(store.join(ruri, s.name), fps[s.name])
        if st.state == "done":
            manifests[s.name] = st.manifest
    for s in stages:
        if s.name in manifests:
            summary.outcomes[s.name] = StageOutcome(s.name, "skipped", manifests[s.name])
            log(f"✓ {s.name}: done already (fingerprint {fps[s.name][:12]}), skipped")
        else:
            todo.append(s)
    if only is not None:
        for s in todo:
            missing = [d for d in deps_in_spec(s, spec) if d not in manifests and d not in only]
            if missing:
                raise StageFailed(f"stage {s.name} needs {', '.join(missing)} to be done first; "
                                  f"run `t2i resume {ruri}` or add --from {missing[0]}")
    if not todo:
        return summary
    start_orphan_reaper()
    use_ray = spec.cluster.use_ray
    if use_ray:
        from pipeline.ray_exec import run_on_ray

        run_on_ray(spec, todo, fps, manifests, summary, address=address, log=log)
    else:
        _run_in_process(spec, todo, fps, manifests, summary, log)
    return summary


def _run_in_process(spec, todo, fps, manifests, summary, log) -> None:
    data = spec.model_dump(mode="json")
    for s in todo:
        blocked = [d for d in deps_in_spec(s, spec) if d not in manifests]
        if blocked:
            summary.outcomes[s.name] = StageOutcome(s.name, "blocked", error=f"needs {', '.join(blocked)}")
            continue
        log(f"▶ {s.name}: running")
        t0 = time.time()
        try:
            m = execute_stage(s.name, data, {d: manifests[d] for d in deps_in_spec(s, spec)}, fps[s.name], False)
        except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
            summary.outcomes[s.name] = StageOutcome(s.name, "failed", error=_error_message(e), duration_s=time.time() - t0)
            log(f"✗ {s.name}: {_error_message(e)}")
            continue
        manifests[s.name] = m
        summary.outcomes[s.name] = StageOutcome(s.name, "ran", m, duration_s=time.time() - t0)
        log(f"✓ {s.name}: finished in {time.time() - t0:.1f}s")


# A driver killed with SIGKILL cleans up nothing: img2dataset's multiprocessing workers (no-Ray
# runs) and a local Ray's ray::DashboardAgent / ray::RuntimeEnvAgent and stage tasks still
# embedding (Ray runs; gcs_server and raylet do share the driver's fate) were seen to outlive it. A small watcher in its own session keeps a
# list of what this driver started after the watcher itself, and kills what is left once the
# driver is gone (TERM, then KILL). It never touches processes older than itself or outside
# the driver's process tree, and it exits with the driver.
_REAPER_CODE = r"""
import os, select, sys, time
import psutil
me, driver = os.getpid(), psutil.Process(int(sys.argv[1]))
t0 = psutil.Process(me).create_time() - 1.0
known = {}
while True:
    try:
        for p in driver.children(recursive=True):
            if p.pid != me and p.create_time() >= t0:
                known[p.pid] = p
    except psutil.Error:
        pass
    r, _, _ = select.select([sys.stdin], [], [], 0.5)
    if (r and not os.read(sys.stdin.fileno(), 4096)) or not driver.is_running():
        break
deadline = time.monotonic() + 3
while driver.is_running() and time.monotonic() < deadline:  # a normal exit: give ray.shutdown its time
    time.sleep(0.2)
left = [p for p in known.values() if p.is_running()]
for p in left:
    try: p.terminate()
    except psutil.Error: pass
_, left = psutil.wait_procs(left, timeout=3)
for p in left:
    try: p.kill()
    except psutil.Error: pass
"""
_reaper = None  # kept referenced: dropping the Popen would close its stdin and trigger it early


def start_orphan_reaper() -> None:
    """Start (once per process) the watcher that cleans up after a killed driver (see above)."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    _reaper = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def resume_targets(spec, stage: str | None, from_stage: str | None) -> tuple[list[str] | None, list[str]]:
    """(only, force) for ``t2i resume``: one stage, or one and everything downstream."""
    if stage and from_stage:
        raise StageFailed("give either --stage or --from, not both")
    name = stage or from_stage
    if name is None:
        return None, []
    get_stage(name)
    if getattr(spec, name, None) is None:
        raise StageFailed(f"stage {name} is not configured in this run's spec")
    if stage:
        return [stage], [stage]
    names = downstream(from_stage, spec)
    return names, names


def load_run_spec(run: str):
    """The spec a run was started with (saved at <run>/spec.yaml)."""
    import yaml

    uri = store.join(run, "spec.yaml")
    if not store.exists(uri):
        raise StageFailed(f"{run} is not a run: {uri} does not exist")
    return parse_spec(yaml.safe_load(store.read_bytes(uri)), uri)


def run_status(run: str) -> list[dict]:
    spec = load_run_spec(run)
    fps = plan_fingerprints(spec)
    rows = []
    for s in enabled_stages(spec):
        uri = store.join(run, s.name)
        st = mf.stage_state(uri, fps[s.name])
        err = None
        if st.state != "done" and store.exists(store.join(uri, ERROR_FILE)):
            err = store.read_json(store.join(uri, ERROR_FILE)).get("error")
        m = st.manifest or {}
        rows.append({"stage": s.name, "state": "failed" if err else st.state, "fingerprint": fps[s.name][:12],
                     "counts": m.get("counts", {}), "duration_s": m.get("duration_s"),
                     "node": (m.get("node") or {}).get("node_ip") or (m.get("node") or {}).get("hostname"),
                     "error": err})
    return rows


def dumps_summary(summary: RunSummary) -> str:
    return json.dumps({k: {"status": o.status, "error": o.error} for k, o in summary.outcomes.items()}, indent=2)
