"""``t2i run | resume | rerun | status | gc``: a run's life on the store.

``resume`` continues (never deletes, never restarts); ``rerun`` starts stages as new attempts
beside the old ones; ``gc`` is the only command that deletes, and only with ``--yes``.
"""
from __future__ import annotations

import json
import time
from typing import List, Optional

import typer
from rich.table import Table

from pipeline import layout, store
from pipeline.cli.common import console, err_console, fail, load_spec_or_fail, resolve_run
from pipeline.context import StageFailed
from stages.sampling.demo_check import figures_by_cascade

app = typer.Typer()  # its commands join the main app in pipeline/cli/__init__.py


def _summary_table(summary) -> Table:
    t = Table(title=f"run {summary.run_uri}")
    for col in ("stage", "status", "duration", "counts", "where"):
        t.add_column(col)
    for name, o in summary.outcomes.items():
        m = o.manifest or {}
        counts = ", ".join(f"{k}={v}" for k, v in list((m.get("counts") or {}).items())[:4])
        dur = f"{(m.get('duration_s') if o.status == 'skipped' else o.duration_s) or 0:.1f}s"
        node = m.get("node") or {}
        style = {"ran": "green", "skipped": "cyan", "failed": "red", "blocked": "yellow", "held": "magenta"}[o.status]
        t.add_row(name, f"[{style}]{o.status}[/]", dur, counts or (o.error or ""),
                  node.get("node_ip") or node.get("hostname", ""))
    return t


WAIT_HELP = "If another driver is working on a stage of this run, wait for it instead of exiting."
TAKE_OVER_HELP = ("Take over the stages another driver holds (only for a driver known to be dead: a lease whose "
                  "heartbeat stopped is taken over anyway after 2 minutes).")


def _verbose() -> bool:
    """``t2i --debug``: also forward the stages' own output and Ray's logs."""
    import click  # speed: t2i --help never loads click (typer bundles its own copy)

    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug"))


def _run_and_report(spec, *, wait: bool = False, **kw) -> None:
    from pipeline.run.lease import INTERVAL_S  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.runner import run_pipeline  # speed: as above

    waited = False
    while True:
        try:
            summary = run_pipeline(spec, log=lambda m: console.print(m), live_console=console,
                                   verbose=_verbose(), **kw)
        except StageFailed as e:
            fail(str(e))
        held = {k: o for k, o in summary.outcomes.items() if o.status == "held"}
        if not (held and wait):
            break
        if not waited:
            first = next(iter(held.values()))
            console.print(f"… waiting: {first.name} {first.error.split(' ', 1)[-1] if first.error else ''}")
            waited = True
        time.sleep(min(5.0, INTERVAL_S))  # then plan again: what the other driver finished is skipped
    console.print(_summary_table(summary))
    if held:
        first = next(iter(held.values()))
        err_console.print(f"[magenta]{first.name}[/] {first.error.split(' ', 1)[-1] if first.error else ''}; "
                          f"{len(held)} stage(s) left alone. Wait for it: the same command with --wait; if that "
                          "driver is known to be dead: --take-over")
        raise typer.Exit(3)
    failed = {k: o for k, o in summary.outcomes.items() if o.status in ("failed", "blocked")}
    for k, o in failed.items():
        err_console.print(f"[red]{k}[/]: {o.error}")
    sample = summary.outcomes.get("sample")
    if sample and sample.manifest:
        outs = sample.manifest.get("outputs", {})
        console.print(f"samples: {outs.get('dir') or sample.manifest.get('out_uri')}")
        if outs.get("report"):
            console.print(f"report:  {outs['report']}")
        met = sample.manifest.get("metrics", {})
        # the demo check of every cascade sampled (and of CLIP-guided halves): do the samples follow their prompts?
        for casc, f in figures_by_cascade(met).items():
            position = (f", position accuracy {f['demo_position_accuracy']:.2f}"
                        if "demo_position_accuracy" in f else "")
            console.print(f"demo check ({casc}): colour accuracy {f['demo_colour_accuracy']:.2f} "
                          f"(chance {f['demo_colour_chance']:.2f}){position} over {int(f['demo_n'])} prompts")
    evaluation = summary.outcomes.get("evaluate")
    if evaluation and evaluation.manifest:
        _print_evaluation(evaluation.manifest)
        whole = _whole_run_report(summary.run_uri)  # sample wrote its report before evaluate finished
        if whole:
            console.print(f"report (with the evaluation): {whole}")
    if failed:
        raise typer.Exit(1)


HEADLINE = ("_fid", "_clip_score", "prior_cosine_similarity", "prior_text_baseline", "_val_loss",
            "heldout_clip_score")


def _print_evaluation(manifest: dict) -> None:
    """The evaluate stage's headline figures (docs/evaluation.md says how to read them)."""
    from stages.evaluate import evaluation_rows  # heavy: stage code, loaded when there is an evaluation to print

    console.print(f"evaluation: {store.join(manifest.get('out_uri'), layout.MANIFEST)}")
    for name, value, meaning in evaluation_rows(manifest):
        if name.endswith(HEADLINE) and not name.endswith("_suite"):
            console.print(f"  {name:32s} {value:9.4f}  {meaning}")


def _headline(row: dict) -> str:
    """A stage's headline figures for `t2i status`: losses, evaluation, the demo check."""
    m = row.get("metrics") or {}
    keys = [k for k in m if k in ("final_loss", "val_loss") or k.endswith(("_fid", "_clip_score", "_demo_colour_accuracy",
                                                                         "_demo_position_accuracy"))
            or k == "prior_cosine_similarity"]
    return ", ".join(f"{k}={m[k]:.3g}" for k in keys[:6])


@app.command()
def run(spec: Optional[str] = typer.Argument(None, help="Run spec YAML (default: the demo spec)."),
        address: Optional[str] = typer.Option(None, help="Ray address of an existing cluster (auto, ray://host:10001)."),
        set_: List[str] = typer.Option([], "--set", help="Override a spec field: section.field=value (repeatable)."),
        no_ray: bool = typer.Option(False, "--no-ray", help="Run every stage in this process, without Ray."),
        wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
        take_over: bool = typer.Option(False, "--take-over", help=TAKE_OVER_HELP),
        ) -> None:
    """Run a pipeline: skip finished stages, continue or extend the rest, print a summary."""
    overrides = list(set_) + (["cluster.use_ray=false"] if no_ray else [])
    _run_and_report(load_spec_or_fail(spec, overrides), address=address, wait=wait, take_over=take_over)


def _run_spec_and_targets(run: str, stage: Optional[str], from_: Optional[str], no_ray: bool):
    from pipeline.run.planning import load_run_spec  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.runner import targets  # speed: as above

    uri = resolve_run(run)
    try:
        spec = load_run_spec(uri)
        names = targets(spec, stage, from_)
    except (StageFailed, KeyError) as e:
        fail(str(e).strip("'\""))
    if no_ray:
        spec.cluster.use_ray = False
    return spec, names


@app.command()
def resume(run: str = typer.Argument(..., help="Run URI or run id."),
           stage: Optional[str] = typer.Option(None, help="Resume just this stage (finish it, or extend it to the "
                                                          "spec's steps)."),
           from_: Optional[str] = typer.Option(None, "--from", help="Resume this stage and everything downstream."),
           address: Optional[str] = typer.Option(None, help="Ray address of an existing cluster."),
           no_ray: bool = typer.Option(False, "--no-ray", help="Run every stage in this process, without Ray."),
           wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
           take_over: bool = typer.Option(False, "--take-over", help=TAKE_OVER_HELP)) -> None:
    """Finish a run from where it stopped. Continues from the latest complete checkpoint;
    a finished stage is a no-op. Nothing is deleted or restarted (see `t2i rerun`)."""
    spec, names = _run_spec_and_targets(run, stage, from_, no_ray)
    _run_and_report(spec, only=names, address=address, wait=wait, take_over=take_over)


@app.command()
def rerun(run: str = typer.Argument(..., help="Run URI or run id."),
          stage: Optional[str] = typer.Option(None, help="Start just this stage afresh."),
          from_: Optional[str] = typer.Option(None, "--from", help="Start this stage and everything downstream afresh."),
          address: Optional[str] = typer.Option(None, help="Ray address of an existing cluster."),
          no_ray: bool = typer.Option(False, "--no-ray", help="Run every stage in this process, without Ray."),
          wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
          take_over: bool = typer.Option(False, "--take-over", help=TAKE_OVER_HELP)) -> None:
    """Start stages from scratch as new attempts; the old attempts stay on the store until `t2i gc`."""
    if not stage and not from_:
        fail("name what to start afresh: --stage STAGE or --from STAGE")
    spec, names = _run_spec_and_targets(run, stage, from_, no_ray)
    _run_and_report(spec, only=names, fresh=names, address=address, wait=wait, take_over=take_over)


@app.command()
def status(run: str = typer.Argument(..., help="Run URI or run id."),
           as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")) -> None:
    """Each stage's state, attempt, counts and duration, and the superseded attempts kept beside it."""
    from pipeline.run.gc import human_age, human_bytes  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.planning import run_status  # speed: as above
    from pipeline.run.submit import job_status_line  # speed: as above

    uri = resolve_run(run)
    try:
        rows = run_status(uri)
    except StageFailed as e:
        fail(str(e))
    if as_json:
        print(json.dumps({"run": uri, "stages": rows}, indent=2, default=str))
        return
    t = Table(title=f"run {uri}")
    for col in ("stage", "state", "attempt", "duration", "counts", "headline", "where"):
        t.add_column(col, overflow="fold")
    colors = {"done": "green", "partial": "yellow", "pending": "white", "extend": "magenta", "failed": "red"}
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items()) or ((r["error"] or "").splitlines() or [""])[0][:300]
        dur = f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else ""
        where = r["node"] or ""
        if r.get("lease"):  # an unfinished stage some driver holds (or held, if its heartbeat stopped)
            lease = r["lease"]
            where = ("held by " if not lease["expired"] else "expired lease of ") + lease["held_by"]
        t.add_row(r["stage"], f"[{colors[r['state']]}]{r['state']}[/]", r["attempt"], dur, counts, _headline(r), where)
    console.print(t)
    old = [(r["stage"], a) for r in rows for a in r["superseded"]]
    if old:
        console.print(f"superseded attempts (kept; `t2i gc {run}` lists what it would remove):")
        for stage, a in old:
            console.print(f"  {stage}/{a['attempt']}: {a['state']}, {human_bytes(a['bytes'])}, {human_age(a['age_s'])} old")
    line = job_status_line(uri)  # a submitted run: the Ray job's own state too
    if line:
        console.print(line)


def _whole_run_report(run_uri: str) -> Optional[str]:
    """``<run>/report.html``: the sample stage's report with the run part (stages, training curves,
    evaluation) rebuilt now. Sample and evaluate run side by side, so the sample stage's own copy
    has no evaluation; this one is derived (rebuilt on every call), never listed by a manifest."""
    from stages.report.page import refresh_report  # torch (via the run section): t2i --help must not load it

    sample = layout.finished_stage_dir(run_uri, "sample")
    if sample is None:
        return None
    src = store.join(sample, layout.REPORT)
    if not store.exists(src):
        return None
    return refresh_report(src, run_uri, out_uri=store.join(run_uri, layout.REPORT))


@app.command()
def report(run: str = typer.Argument(..., help="Run URI or run id with a finished sample stage.")) -> None:
    """Rebuild ``<run>/report.html``: samples, stages, training curves and the evaluation (also
    written at the end of every run; safe while a run trains: it reads only what is written)."""

    uri = resolve_run(run)
    if not store.exists(layout.run_spec_uri(uri)):
        fail(f"{uri} is not a run: {layout.run_spec_uri(uri)} does not exist")
    try:
        out = _whole_run_report(uri)
    except ValueError as e:
        fail(str(e))
    if out is None:
        fail(f"{uri} has no finished sample stage with a report.html yet: run or resume it first (t2i resume {run})")
    console.print(f"report: {out}")


@app.command()
def gc(run: str = typer.Argument(..., help="Run URI or run id."),
       yes: bool = typer.Option(False, "--yes", help="Really delete (without it: list only)."),
       as_json: bool = typer.Option(False, "--json", help="Print what would be removed as JSON.")) -> None:
    """List superseded attempts and incomplete checkpoints with their sizes; delete them with --yes."""
    from pipeline.run.gc import collect, find_garbage, human_age, human_bytes  # speed: not for t2i --help (yaml, spec)

    uri = resolve_run(run)
    try:
        items = find_garbage(uri)
    except StageFailed as e:
        fail(str(e))
    total = sum(g.bytes for g in items)
    if as_json:
        print(json.dumps({"run": uri, "items": [g.as_dict() for g in items], "bytes": total, "deleted": yes}))
    else:
        for g in items:
            console.print(f"{g.kind:22s} {g.stage}: {g.uri}  {human_bytes(g.bytes)}, {human_age(g.age_s)} old  ({g.note})")
        console.print(f"{len(items)} item(s), {human_bytes(total)}" +
                      ("" if yes or not items else f" — nothing deleted; `t2i gc {run} --yes` removes them"))
    if yes and items:
        collect(items, log=(lambda m: None) if as_json else console.print)
