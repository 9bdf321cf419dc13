"""Runs one stage attempt to completion and records it: what a Ray stage task (or the in-process
runner) executes. Never deletes outputs: an attempt folder holds one fingerprint's work only,
so whatever is there (finished shards, checkpoints) belongs to this attempt and is resumed.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.context import StageContext, StageFailed
from pipeline.executors import LocalExecutor
from pipeline.progress import StageProgress
from pipeline.run.graph import get_stage

ERROR_FILE = layout.ERROR


@dataclass(frozen=True)
class PlannedStage:
    """Where and how far one stage runs in this run (computed by pipeline/run/planning.py)."""

    name: str
    fingerprint: str
    attempt_uri: str
    extent: dict
    output_id: str
    input_ids: dict


@dataclass
class StageOutcome:
    name: str
    status: str                     # ran | skipped | failed | blocked | held (another driver's lease)
    manifest: dict | None = None
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class RunSummary:
    run_uri: str
    outcomes: dict[str, StageOutcome]

    @property
    def ok(self) -> bool:
        return all(o.status in ("ran", "skipped") for o in self.outcomes.values())


def node_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:  # which Ray node, when the stage runs in a Ray task (ray is only imported if already loaded)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - where it ran is informative, never fatal
        pass
    return info


def execute_stage(plan: PlannedStage, cfg: Any, ruri: str, inputs: dict[str, dict], executor: Any = None,
                  progress: Callable[[str], None] | None = None, lease: dict | None = None) -> dict:
    """Run one stage attempt to completion and write its manifest, then point ``_CURRENT`` at it.
    ``lease``: the record of the driver holding the attempt's lease, kept in the manifest.

    ``cfg`` is the stage's own section of the run spec, validated by the driver with the whole
    spec (cross-stage checks included); the task neither sees nor re-parses the rest."""
    out_uri = plan.attempt_uri
    state = mf.stage_state(out_uri, plan.fingerprint, plan.extent)
    if state.state == "done":
        return state.manifest
    # A "short" attempt keeps its manifest while it is extended: its outputs stay valid (a new
    # final/step_N folder is written beside the old), and the new manifest replaces it atomically.
    store.remove(store.join(out_uri, ERROR_FILE))
    mf.mark_started(out_uri, plan.fingerprint)
    # Messages and live figures go to the attempt's progress file; the driver shows them
    # (pipeline/run/console.py), wherever this runs.
    reporter = StageProgress(out_uri, echo=progress)
    ctx = StageContext(run_uri=ruri, out_uri=out_uri, inputs=inputs, executor=executor or LocalExecutor(),
                       progress=reporter, previous=state.manifest)
    t0 = time.time()
    try:
        result = get_stage(plan.name).load().run(cfg, ctx)
    except BaseException as e:
        reporter.flush()
        _record_error(out_uri, e)
        raise
    reporter.flush()
    m = mf.write_manifest(out_uri, stage=plan.name, fp=plan.fingerprint, started_at=t0, counts=result.counts,
                          metrics=result.metrics, outputs=result.outputs, node=node_info(),
                          config=mf.config_for_fingerprint(cfg), extent=plan.extent, output_id=plan.output_id,
                          inputs=plan.input_ids, lease=lease)
    layout.write_current(ruri, plan.name, out_uri)
    return m


def _record_error(out_uri: str, e: BaseException) -> None:
    try:
        store.write_json(store.join(out_uri, ERROR_FILE), {
            "error": f"{type(e).__name__}: {e}", "user_facing": isinstance(e, StageFailed),
            "traceback": traceback.format_exc(), "at": time.time()})
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def error_message(e: BaseException) -> str:
    """The user-facing part of an error, unwrapping Ray's task error."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, StageFailed):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
