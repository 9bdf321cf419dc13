"""Runs the stage graph on Ray: one task per stage, launched as soon as its inputs are done.

The stage task itself asks for no CPU (it coordinates); the work inside it asks for what it
needs (Ray Data actors, Ray Train workers with the stage's resources), so independent training
stages run concurrently when the cluster has room and queue when it does not.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from pipeline.configbase import TaskPlacement
from pipeline.run.graph import deps_in_spec
from pipeline.run.ray_executor import RayExecutor, trains_in_task
from pipeline.run.reaper import start_orphan_reaper
from pipeline.run.spec import run_uri
from pipeline.run.stage_exec import StageOutcome, error_message, execute_stage


def _level(verbose: bool) -> str:
    # Ray's own start-up notices (token auth on, dashboard disabled, ...) are for --debug; errors
    # still show. The stages' progress reaches the user through the store (pipeline/run/console.py).
    return "INFO" if verbose else "ERROR"


def init_ray(cluster, address: str | None = None, verbose: bool = False) -> None:
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    if ray.is_initialized():
        return
    address = address or cluster.address
    # Ray workers read the store through fsspec; keep their logs quiet about progress bars.
    # Ray Data's per-operator bars flood a driver that runs several stages; stages report their own progress.
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # A training stage whose workers don't fit yet must queue behind the running ones,
           # not fail after Ray Train's default 60 s worker-group start timeout.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "86400")}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level=_level(verbose), log_to_driver=verbose)
        return
    start_orphan_reaper()  # a SIGKILLed driver leaves Ray's agents behind otherwise
    ray.init(address="local", num_cpus=cluster.num_cpus or os.cpu_count(), num_gpus=cluster.num_gpus,
             include_dashboard=cluster.include_dashboard, dashboard_host=cluster.dashboard_host,
             runtime_env={"env_vars": env}, logging_level=_level(verbose), log_to_driver=verbose)


def run_on_ray(spec, todo, plans, manifests, summary, *, address: str | None, console, verbose: bool = False,
               keeper=None) -> None:
    """Stages' own output stays on their workers (``verbose``: forward it, with Ray's logs); the
    driver shows what they report through the store (pipeline/run/console.py)."""
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    owned = not ray.is_initialized()  # a Ray we start, we stop: callers in one process run many specs
    init_ray(spec.cluster, address, verbose)
    try:
        _schedule(spec, todo, plans, manifests, summary, console, keeper)
    finally:
        if owned:
            ray.shutdown()


def _schedule(spec, todo, plans, manifests, summary, console, keeper) -> None:
    """``keeper``: this driver's leases (pipeline/run/lease.py); each stage's goes when it ends."""
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    remote_stage = ray.remote(num_cpus=0, max_retries=0)(execute_stage)
    ruri = run_uri(spec)
    pending = list(todo)
    running: dict = {}  # ObjectRef -> (stage name, start time)
    while pending or running:
        for s in list(pending):
            deps = deps_in_spec(s, spec)
            failed = [d for d in deps if d in summary.outcomes and summary.outcomes[d].status in ("failed", "blocked")]
            if failed:
                summary.outcomes[s.name] = StageOutcome(s.name, "blocked", error=f"{', '.join(failed)} failed")
                pending.remove(s)
                console.say(f"- {s.name}: not run, {', '.join(failed)} failed")
            elif all(d in manifests for d in deps):
                options = _task_options(getattr(spec, s.name))
                here = RayExecutor(address=None, train_in_task="num_cpus" in options)
                lease = keeper.takeover_record(plans[s.name].attempt_uri) if keeper is not None else None
                ref = remote_stage.options(name=f"stage:{s.name}", **options).remote(
                    plans[s.name], getattr(spec, s.name), ruri, {d: manifests[d] for d in deps}, here, None, lease)
                running[ref] = (s.name, time.time())
                pending.remove(s)
                console.say(f"▶ {s.name}: started")
                console.started(s.name, plans[s.name].attempt_uri)
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=_LEASE_CHECK_S)
        _cancel_lost(running, plans, keeper, ray)
        for ref in done:
            name, t0 = running.pop(ref)
            console.finished(name)
            try:
                if keeper is not None:
                    _release_checked(keeper, plans[name].attempt_uri)
                m = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - reported in the summary, independent stages go on
                summary.outcomes[name] = StageOutcome(name, "failed", error=error_message(e), duration_s=time.time() - t0)
                console.say(f"✗ {name}: {error_message(e)}")
                continue
            manifests[name] = m
            summary.outcomes[name] = StageOutcome(name, "ran", m, duration_s=time.time() - t0)
            where = (m.get("node") or {}).get("node_ip", "")
            console.say(f"✓ {name}: finished in {time.time() - t0:.1f}s{' on ' + where if where else ''}")


_LEASE_CHECK_S = 5.0  # how often the wait for stage tasks looks for a lease lost to another driver


def _release_checked(keeper, uri: str) -> None:
    """Release the attempt's lease; raise if it had been lost to another driver meanwhile."""
    try:
        keeper.check(uri)
    finally:
        keeper.release(uri)


def _cancel_lost(running: dict, plans, keeper, ray) -> None:
    """Stop the stage tasks whose lease another driver took over: two writers on one attempt is
    what the lease exists to prevent."""
    if keeper is None:
        return
    for ref, (name, _) in list(running.items()):
        h = keeper.held.get(plans[name].attempt_uri)
        if h is not None and h.lost:
            ray.cancel(ref, force=True)


def _task_options(cfg) -> dict:
    """What a stage's own Ray task reserves. Download/embed run inside it: their ``resources`` pin
    it. A one-rank CPU training stage trains inside it too, so it reserves that rank's CPUs (and
    its restarts are task retries); other training stages place Ray Train workers themselves."""
    if isinstance(cfg, TaskPlacement):
        return {"resources": dict(cfg.resources)}
    placement = getattr(cfg, "placement", None)
    p = placement() if callable(placement) else None
    if p is not None and trains_in_task(p):
        return {"num_cpus": p.cpus_per_worker, "resources": dict(p.resources), "max_retries": p.max_failures,
                "retry_exceptions": False}
    return {}
