"""The ``t2i`` command line: run, status, resume, embed, sample, flavors, bench, submit."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train unCLIP / Imagen text-to-image cascades on Ray + DeepSpeed.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed: training step, embedding, loader.")
app.add_typer(bench_app, name="bench")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def resolve_run(run: str) -> str:
    """A run URI, a local path, or a bare run id under the default store (./runs)."""
    from pipeline.store import normalize

    if "://" in run or os.sep in run or os.path.exists(run):
        return normalize(run)
    return normalize(os.path.join("runs", run))


def _summary_table(summary) -> Table:
    t = Table(title=f"run {summary.run_uri}")
    for col in ("stage", "status", "duration", "counts", "where"):
        t.add_column(col)
    for name, o in summary.outcomes.items():
        m = o.manifest or {}
        counts = ", ".join(f"{k}={v}" for k, v in list((m.get("counts") or {}).items())[:4])
        dur = f"{(m.get('duration_s') if o.status == 'skipped' else o.duration_s) or 0:.1f}s"
        node = m.get("node") or {}
        style = {"ran": "green", "skipped": "cyan", "failed": "red", "blocked": "yellow"}[o.status]
        t.add_row(name, f"[{style}]{o.status}[/]", dur, counts or (o.error or ""), node.get("node_ip") or node.get("hostname", ""))
    return t


def _run_and_report(spec, **kw) -> None:
    from pipeline.context import StageFailed
    from pipeline.runner import run_pipeline

    try:
        summary = run_pipeline(spec, log=lambda m: console.print(m), **kw)
    except StageFailed as e:
        _fail(str(e))
    console.print(_summary_table(summary))
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
        for casc in ("imagen", "unclip"):  # the demo check: do the samples follow their prompts?
            if f"{casc}_demo_colour_accuracy" in met:
                console.print(f"demo check ({casc}): colour accuracy {met[casc + '_demo_colour_accuracy']:.2f} "
                              f"(chance {met[casc + '_demo_colour_chance']:.2f}), position accuracy "
                              f"{met[casc + '_demo_position_accuracy']:.2f} over {int(met[casc + '_demo_n'])} prompts")
    if failed:
        raise typer.Exit(1)


def _load(spec_path: Optional[str], overrides: List[str]):
    from pipeline.spec import SpecError, load_spec, parse_override

    try:
        return load_spec(spec_path, dict(parse_override(o) for o in overrides))
    except SpecError as e:
        _fail(str(e))


@app.command()
def run(spec: Optional[str] = typer.Argument(None, help="Run spec YAML (default: the demo spec)."),
        address: Optional[str] = typer.Option(None, help="Ray address of an existing cluster (auto, ray://host:10001)."),
        set_: List[str] = typer.Option([], "--set", help="Override a spec field: section.field=value (repeatable)."),
        no_ray: bool = typer.Option(False, "--no-ray", help="Run every stage in this process, without Ray."),
        ) -> None:
    """Run a pipeline: skip finished stages, run (or resume) the rest, print a summary."""
    overrides = list(set_) + (["cluster.use_ray=false"] if no_ray else [])
    s = _load(spec, overrides)
    _run_and_report(s, address=address)


@app.command()
def resume(run: str = typer.Argument(..., help="Run URI or run id."),
           stage: Optional[str] = typer.Option(None, help="Re-run just this stage."),
           from_: Optional[str] = typer.Option(None, "--from", help="Re-run this stage and everything downstream."),
           address: Optional[str] = typer.Option(None, help="Ray address of an existing cluster."),
           no_ray: bool = typer.Option(False, "--no-ray")) -> None:
    """Finish a run from where it stopped, or re-run one stage (and its downstream)."""
    from pipeline.context import StageFailed
    from pipeline.runner import load_run_spec, resume_targets

    uri = resolve_run(run)
    try:
        spec = load_run_spec(uri)
        only, force = resume_targets(spec, stage, from_)
    except (StageFailed, KeyError) as e:
        _fail(str(e).strip("'\""))
    if no_ray:
        spec.cluster.use_ray = False
    _run_and_report(spec, only=only, force=force, address=address)


@app.command()
def status(run: str = typer.Argument(..., help="Run URI or run id.")) -> None:
    """Each stage's state, fingerprint, counts and duration."""
    from pipeline.context import StageFailed
    from pipeline.runner import run_status

    uri = resolve_run(run)
    try:
        rows = run_status(uri)
    except StageFailed as e:
        _fail(str(e))
    t = Table(title=f"run {uri}")
    for col in ("stage", "state", "fingerprint", "duration", "counts", "where"):
        t.add_column(col)
    colors = {"done": "green", "partial": "yellow", "pending": "white", "stale": "magenta", "failed": "red"}
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in list(r["counts"].items())[:4]) or (r["error"] or "")
        dur = f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else ""
        t.add_row(r["stage"], f"[{colors[r['state']]}]{r['state']}[/]", r["fingerprint"], dur, counts, r["node"] or "")
    console.print(t)
    from pipeline.submit import job_status_line

    line = job_status_line(uri)  # a submitted run: the Ray job's own state too
    if line:
        console.print(line)


@app.command()
def flavors() -> None:
    """Named network sizes per model, with parameter counts (counted on the meta device)."""
    from stages.nets.flavors import count_params, list_flavors

    t = Table(title="flavors")
    for col in ("role", "flavor", "image", "params", "target"):
        t.add_column(col)
    for f in list_flavors():
        n = count_params(f.role, f.name)
        size = f"{f.low_res_size}→{f.image_size}" if f.low_res_size else (str(f.image_size) if f.image_size else "-")
        tgt = f"{f.target_params / 1e6:,.0f}M" if f.target_params else ""
        t.add_row(f.role, f.name, size, f"{n / 1e6:,.1f}M", tgt)
    console.print(t)


@app.command()
def embed(shards: str = typer.Option(..., help="URI of download shards (a folder of NNNNN.tar)."),
          out: str = typer.Option(..., help="URI to write the embedding shards to."),
          clip: Optional[str] = typer.Option(None, help="open_clip model name, 'name:pretrained' or a local directory."),
          t5: Optional[str] = typer.Option(None, help="T5 hub name or local directory."),
          spec: Optional[str] = typer.Option(None, help="Take the embed config from this run spec (default: demo spec)."),
          address: Optional[str] = typer.Option(None, help="Ray address; omit to embed in this process.")) -> None:
    """Precompute CLIP/T5 embeddings for existing shards, outside a pipeline run."""
    from data_prep.embed import embed_offline

    cfg = _load(spec, []).embed
    if clip:
        # "ViT-L-14:openai" -> name + tag; a directory or "tiny:DIR" is the model itself.
        if os.path.exists(clip) or clip.startswith("tiny:") or clip.startswith("hf-hub:"):
            name, pretrained = clip, ""
        else:
            name, _, pretrained = clip.partition(":")
        cfg = cfg.model_copy(update={"clip": cfg.clip.model_copy(update={"model": name, "pretrained": pretrained or None})})
    if t5:
        cfg = cfg.model_copy(update={"t5": cfg.t5.model_copy(update={"model": t5})})
    result = embed_offline(shards, out, cfg, address=address, progress=True)
    console.print(result)


@app.command()
def sample(run: str = typer.Argument(..., help="Run URI or run id with trained stages."),
           prompt: List[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
           cascade: str = typer.Option("imagen", help="imagen (base→SR) or unclip (prior→decoder→SR)."),
           guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale for every model "
                                                     "(default: per model, e.g. 3 for base/decoder, 1 for the upsamplers)."),
           steps: Optional[int] = typer.Option(None, help="Sampler steps per model (default: the sample config's)."),
           out: Optional[str] = typer.Option(None, help="Where to write PNGs (default: <run>/samples_cli).")) -> None:
    """Sample prompts through a trained cascade."""
    from stages.sample import sample_cli

    uri = resolve_run(run)
    paths = sample_cli(uri, list(prompt), cascade=cascade, guidance=guidance, steps=steps, out=out)
    for p in paths:
        console.print(p)


from pipeline import cli_extra  # noqa: E402,F401  (bench / submit commands register themselves)


def main() -> None:  # pragma: no cover
    sys.exit(app())
