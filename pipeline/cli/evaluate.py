"""``t2i eval RUN [--checkpoint STEP]``: the evaluate stage's figures, offline.

Reads the run's saved spec (its ``evaluate`` section, or the defaults when it has none) and the
finished attempts of its stages, and runs the same :func:`stages.evaluate.evaluate` as the stage,
so on the final weights it reproduces the stage's figures. ``--checkpoint STEP`` evaluates every
training stage at that step instead (a finished ``final/step_N/`` or a checkpoint's EMA).
"""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from pipeline import layout, store
from pipeline.cli.common import console, fail, resolve_run
from pipeline.manifest import read_manifest
from pipeline.run.lease import LeaseHeld, leased
from stages.models import TRAIN_STAGES

app = typer.Typer()


@app.command("eval")
def eval_run(run: str = typer.Argument(..., help="Run URI or run id with trained stages."),
             checkpoint: Optional[int] = typer.Option(None, "--checkpoint", help=(
                 "Evaluate every training stage at this step (default: the final weights).")),
             out: Optional[str] = typer.Option(None, help="Where to write evaluation.json (default: <run>/eval_cli/...)."),
             checkpoints: bool = typer.Option(False, "--checkpoints", help=(
                 "Evaluate each complete checkpoint of every training stage not evaluated yet (also while the "
                 "run trains) and append its row to <attempt>/eval.jsonl.")),
             as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON.")) -> None:
    """Evaluate a run's trained models: FID, CLIP score, prior similarity, validation losses."""
    from pipeline.run.planning import finished_attempt, load_run_spec  # speed: not for t2i --help (yaml, spec)
    from stages.evaluate import EvaluateConfig, evaluate, evaluation_rows  # heavy: stage code, loaded when it runs

    uri = resolve_run(run)
    spec = load_run_spec(uri)
    cfg = getattr(spec, "evaluate", None) or EvaluateConfig()
    if checkpoints:
        return _follow(uri, spec, cfg, as_json)
    inputs = {st: read_manifest(finished_attempt(uri, st)) for st in ("download", "embed", *TRAIN_STAGES)
              if getattr(spec, st, None) is not None}
    out_uri = store.normalize(out) if out else store.join(
        uri, layout.EVAL_CLI, layout.step_name(checkpoint) if checkpoint is not None else layout.FINAL)
    stage_uris = None
    if checkpoint is not None:
        from stages.evaluate.offline import checkpoint_inputs  # torch: t2i --help must not load it

        stage_uris, inputs = checkpoint_inputs(inputs, checkpoint, out_uri)
    progress = (lambda m: None) if as_json else (lambda m: console.print(m))
    try:
        with leased("eval", out_uri, log=progress):  # one writer of the output folder
            result = evaluate(cfg, uri, inputs, out_uri, progress=progress, stage_uris=stage_uris)
    except LeaseHeld as e:
        fail(f"{out_uri}: {e}; wait for it, or stop that driver")
    if as_json:
        typer.echo(json.dumps({"metrics": result.metrics, "counts": result.counts, "outputs": result.outputs},
                              sort_keys=True))
        return
    table = Table(title=f"evaluation of {uri}" + (f" at step {checkpoint}" if checkpoint is not None else ""))
    for col in ("figure", "value", "meaning"):
        table.add_column(col)
    for name, value, meaning in evaluation_rows({"metrics": result.metrics, "outputs": result.outputs}):
        table.add_row(name, f"{value:.4g}", meaning)
    console.print(table)
    console.print(f"written: {result.outputs['evaluation']}")


def _follow(uri: str, spec, cfg, as_json: bool) -> None:
    """``--checkpoints``: training stages may still be running (their attempt is the spec's)."""
    from pipeline.run.planning import finished_attempt, stage_uri  # speed: not for t2i --help (yaml, spec)
    from stages.evaluate.follow import EVAL_LOG, evaluate_checkpoints  # torch: t2i --help must not load it

    inputs = {st: read_manifest(finished_attempt(uri, st)) for st in ("download", "embed")}
    train_cfgs = {st: getattr(spec, st) for st in TRAIN_STAGES if getattr(spec, st, None) is not None}
    for st in train_cfgs:
        attempt = stage_uri(uri, st)
        inputs[st] = read_manifest(attempt) or {"out_uri": attempt}
    progress = (lambda m: None) if as_json else (lambda m: console.print(m))
    follow_uri = store.join(uri, layout.EVAL_CLI, layout.CHECKPOINTS)
    try:
        with leased("eval --checkpoints", follow_uri, log=progress):  # one follower per run
            added = evaluate_checkpoints(cfg, uri, inputs, train_cfgs, follow_uri, progress=progress)
    except LeaseHeld as e:
        fail(f"{follow_uri}: {e}; wait for it, or stop that driver")
    if as_json:
        typer.echo(json.dumps(added, sort_keys=True))
        return
    for st, rows in added.items():
        console.print(f"{st}: {len(rows)} new row(s) in {store.join(inputs[st]['out_uri'], EVAL_LOG)}")
