"""Executes a run spec's stage graph, on Ray or in this process.

Every stage is a plain function ``run(cfg, ctx)``; this module decides *whether* it runs
(pipeline/run/planning.py: which attempt, done or not), *where* (a Ray task per stage via
pipeline/run/ray_scheduler.py, so independent training stages run side by side when the cluster has
room) and reports the outcome. The manifest is written by the stage's own task
(pipeline/run/stage_exec.py), so a dying driver never loses a finished stage.

Nothing here deletes: a changed stage runs as a new attempt beside the old one, a longer one
continues in place, and only ``t2i gc --yes`` (pipeline/run/gc.py) removes anything.
"""
from __future__ import annotations

import time
from typing import Callable

from data_prep.encoder_check import encoder_problems
from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.context import StageFailed
from pipeline.run.graph import StageDef, deps_in_spec, downstream, enabled_stages, get_stage
from pipeline.run.lease import LeaseHeld, LeaseKeeper
from pipeline.run.planning import plan_stages
from pipeline.run.console import ProgressConsole
from pipeline.run.ray_scheduler import run_on_ray
from pipeline.run.reaper import start_orphan_reaper
from pipeline.run.spec import run_uri, spec_to_yaml
from pipeline.run.stage_exec import RunSummary, StageOutcome, error_message, execute_stage


def save_spec(spec) -> None:
    store.write_bytes_atomic(layout.run_spec_uri(run_uri(spec)), spec_to_yaml(spec).encode())


def run_pipeline(spec, *, only: list[str] | None = None, fresh: list[str] | None = None,
                 address: str | None = None, log: Callable[[str], None] = print, live_console=None,
                 verbose: bool = False, take_over: bool = False) -> RunSummary:
    """Run (or resume) the spec's stages. ``only`` limits the run to those stages (their
    dependencies must be done); ``fresh`` starts those stages as new attempts (the old
    attempts stay on the store until ``t2i gc``). Every attempt it will work on is leased first
    (pipeline/run/lease.py): one held by another live driver is left alone with its downstream
    stages (status ``held``); ``take_over`` takes such leases regardless (an owner known dead)."""
    ruri = run_uri(spec)
    save_spec(spec)
    plans = plan_stages(spec, frozenset(fresh or ()))
    stages = [s for s in enabled_stages(spec) if only is None or s.name in only]
    summary = RunSummary(ruri, {})
    todo: list[StageDef] = []
    manifests: dict[str, dict] = {}
    for s in enabled_stages(spec):
        p = plans[s.name]
        st = mf.stage_state(p.attempt_uri, p.fingerprint, p.extent)
        if st.state == "done":
            manifests[s.name] = st.manifest
    for s in stages:
        p = plans[s.name]
        if s.name in manifests:
            summary.outcomes[s.name] = StageOutcome(s.name, "skipped", manifests[s.name])
            log(f"✓ {s.name}: done already (attempt {_attempt(p)}), skipped")
        else:
            todo.append(s)
    if only is not None:
        for s in todo:
            missing = [d for d in deps_in_spec(s, spec) if d not in manifests and d not in only]
            if missing:
                raise StageFailed(f"stage {s.name} needs {', '.join(missing)} to be done first; "
                                  f"run `t2i resume {ruri}` or add --from {missing[0]}")
    problems = encoder_problems(spec, [s.name for s in todo])  # before any stage: docs/design.md
    if problems:
        raise StageFailed("\n".join(problems))
    for s in todo:
        _announce(plans[s.name], log)
    if not todo:
        return summary
    keeper = LeaseKeeper(log=log)
    try:  # the leases go on success, failure and Ctrl-C alike
        todo = _lease(todo, spec, plans, keeper, summary, take_over)
        if todo:
            start_orphan_reaper()
            todo = _longest_first(todo, spec)
            with ProgressConsole(log, live_console=live_console) as console:
                if spec.cluster.use_ray:
                    run_on_ray(spec, todo, plans, manifests, summary, address=address, console=console,
                               verbose=verbose, keeper=keeper)
                else:
                    _run_in_process(spec, todo, plans, manifests, summary, console, keeper)
    finally:
        keeper.close()
    return summary


def _lease(todo: list[StageDef], spec, plans, keeper: LeaseKeeper, summary: RunSummary,
           take_over: bool) -> list[StageDef]:
    """Lease every attempt this driver will work on, dependencies first; leave alone one that
    another live driver holds, and everything downstream of it. Returns what this driver runs."""
    held: dict[str, LeaseHeld] = {}  # stage -> the other driver's lease it is left alone for
    mine = []
    for s in sorted(todo, key=lambda s: len(_ancestors(s, spec))):
        waits = sorted(a for a in _ancestors(s, spec) if a in held)
        if waits:
            held[s.name] = held[waits[0]]
            why = f"waits for {held[s.name].stage}, which {str(held[s.name]).split(' ', 1)[1]}"
        else:
            try:
                keeper.acquire(s.name, plans[s.name].attempt_uri, take_over=take_over)
                mine.append(s)
                continue
            except LeaseHeld as e:
                held[s.name], why = e, str(e)
        summary.outcomes[s.name] = StageOutcome(s.name, "held", error=why)
    return [s for s in todo if s in mine]


def _longest_first(todo: list[StageDef], spec) -> list[StageDef]:
    """Among stages that can run side by side, start the one with the most work first (training
    steps x batch), so the longest stage never waits for short ones to finish: the run's wall
    time is then bounded by it, not by the sum (dependencies keep their order)."""
    def work(s: StageDef) -> float:
        cfg = getattr(spec, s.name)
        parts = [getattr(cfg, k, 1) for k in ("steps", "batch_size", "grad_accum")]
        if not all(isinstance(p, int) for p in parts):  # sample.steps may be per model: not a training stage
            return 0.0
        return float(parts[0] * parts[1] * parts[2])

    order = {s.name: i for i, s in enumerate(todo)}
    return sorted(todo, key=lambda s: (len(_ancestors(s, spec)), -work(s), order[s.name]))


def _ancestors(s: StageDef, spec) -> set[str]:
    out: set[str] = set()
    stack = list(deps_in_spec(s, spec))
    while stack:
        d = stack.pop()
        if d not in out:
            out.add(d)
            stack += deps_in_spec(get_stage(d), spec)
    return out


def _attempt(p) -> str:
    return p.attempt_uri.rstrip("/").rsplit("/", 1)[-1]


def _announce(p, log) -> None:
    """Say what will happen to a stage's attempt before it runs (continue, extend, new)."""
    st = mf.stage_state(p.attempt_uri, p.fingerprint, p.extent)
    if st.state == "short":
        done = (st.manifest.get("extent") or {})
        log(f"… {p.name}: extending attempt {_attempt(p)} from {done} to {p.extent}")
    elif st.state == "partial":
        log(f"… {p.name}: continuing attempt {_attempt(p)}")
    else:
        others = [n for n, _ in layout.list_attempts(run_uri_of(p), p.name) if n != _attempt(p)]
        if others:
            log(f"… {p.name}: new attempt {_attempt(p)} (kept beside {', '.join(others)}; `t2i gc` lists them)")


def run_uri_of(p) -> str:
    """The run folder of a planned stage's attempt (<run>/<stage>/<attempt>)."""
    return p.attempt_uri.rstrip("/").rsplit("/", 2)[0]


def _run_in_process(spec, todo, plans, manifests, summary, console, keeper: LeaseKeeper) -> None:
    for s in sorted(todo, key=lambda s: len(_ancestors(s, spec))):  # dependencies first
        blocked = [d for d in deps_in_spec(s, spec) if d not in manifests]
        if blocked:
            summary.outcomes[s.name] = StageOutcome(s.name, "blocked", error=f"needs {', '.join(blocked)}")
            continue
        console.say(f"▶ {s.name}: running")
        console.started(s.name, plans[s.name].attempt_uri)
        t0 = time.time()
        uri = plans[s.name].attempt_uri
        try:
            m = execute_stage(plans[s.name], getattr(spec, s.name), run_uri(spec),
                              {d: manifests[d] for d in deps_in_spec(s, spec)}, lease=keeper.takeover_record(uri))
            keeper.check(uri)
        except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
            keeper.release(uri)
            console.finished(s.name)
            summary.outcomes[s.name] = StageOutcome(s.name, "failed", error=error_message(e),
                                                    duration_s=time.time() - t0)
            console.say(f"✗ {s.name}: {error_message(e)}")
            continue
        keeper.release(uri)
        console.finished(s.name)
        manifests[s.name] = m
        summary.outcomes[s.name] = StageOutcome(s.name, "ran", m, duration_s=time.time() - t0)
        console.say(f"✓ {s.name}: finished in {time.time() - t0:.1f}s")


def targets(spec, stage: str | None, from_stage: str | None) -> list[str] | None:
    """The stages ``--stage S`` (just S) or ``--from S`` (S and everything downstream) name."""
    if stage and from_stage:
        raise StageFailed("give either --stage or --from, not both")
    name = stage or from_stage
    if name is None:
        return None
    get_stage(name)
    if getattr(spec, name, None) is None:
        raise StageFailed(f"stage {name} is not configured in this run's spec")
    return [stage] if stage else downstream(from_stage, spec)
