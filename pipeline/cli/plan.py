"""``t2i plan SPEC``: what a run will cost (GPU-hours, days, bytes, dollars) before it starts.

The cost model is stages/bench/plan.py; this file loads the spec, finds what an existing run
of it already measured (its first shards, its manifests) and prints the figures.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.cli.common import console, fail, load_spec_or_fail

app = typer.Typer()
_REPO = Path(__file__).resolve().parents[2]


def _measured(spec):
    """(CorpusFigures or None, {stage: manifest}) of the spec's run when it exists in the store."""
    from pipeline.run.planning import plan_stages  # speed: not for t2i --help (yaml, spec)
    from pipeline.run.spec import run_uri  # speed: as above
    from stages.bench.plan import measure_corpus  # heavy: the cost model, loaded by t2i plan (t2i --help stays fast)

    try:
        if not store.exists(layout.run_spec_uri(run_uri(spec))):
            return None, {}
        plans = plan_stages(spec)
    except Exception:  # noqa: BLE001 - an unreachable store only means nothing is measured
        return None, {}
    manifests = {}
    for name, p in plans.items():
        # the attempt this spec uses, else the one the stage last finished (a spec edited since)
        for uri in (p.attempt_uri, layout.read_current(run_uri(spec), name)):
            m = mf.read_manifest(uri) if uri else None
            if m is not None:
                manifests[name] = m
                break
    shards = {n: (manifests.get(n) or {}).get("outputs", {}).get("shards") for n in ("download", "embed")}
    return measure_corpus(shards["download"], shards["embed"]), manifests


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return str(n)


@app.command("plan")
def plan_cmd(
    spec_path: str = typer.Argument(..., metavar="SPEC", help="run spec (YAML)"),
    gpu: str = typer.Option("h100", "--gpu", help="h100 | h200 | a100 | b200 (dense bf16 peak)"),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="MFU for every training (default: measured, else stated)"),
    price: Optional[float] = typer.Option(None, "--gpu-hour-price", help="$ per GPU-hour (default: a stated list price)"),
    rows: Optional[int] = typer.Option(None, "--rows",
                                       help="URL rows in download.url_list (default: counted if local, else 400M)"),
    success_rate: float = typer.Option(0.65, "--success-rate", help="fraction of URLs that download"),
    cpu_nodes: int = typer.Option(10, "--cpu-nodes", help="16-core nodes running the download"),
    overrides: List[str] = typer.Option([], "--set", help="override a spec field, e.g. train_base.steps=1000"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Cost a run before it starts: samples, FLOPs, GPU-hours, days, bytes and dollars per stage."""
    from stages.bench.plan import GPUS, TINY_DIMS, CorpusFigures, PlanOptions, plan  # heavy: the cost model, as above

    if gpu not in GPUS:
        fail(f"--gpu must be one of {', '.join(GPUS)} (got {gpu!r})")
    if mfu is not None and not 0 < mfu <= 1:
        fail(f"--mfu must be within (0, 1] (got {mfu})")
    if price is not None and price < 0:
        fail(f"--gpu-hour-price must be >= 0 (got {price})")
    if not 0 < success_rate <= 1:
        fail(f"--success-rate must be within (0, 1] (got {success_rate})")
    if rows is not None and rows < 1:
        fail(f"--rows must be >= 1 (got {rows})")
    if cpu_nodes < 1:
        fail(f"--cpu-nodes must be >= 1 (got {cpu_nodes})")
    spec = load_spec_or_fail(spec_path, overrides)
    corpus, manifests = _measured(spec)
    if corpus is None:
        corpus = CorpusFigures()
        emb = getattr(spec, "embed", None)
        if emb is not None and emb.clip.model.startswith("tiny:"):
            corpus.dims = dict(TINY_DIMS)
    cfgs = {n: getattr(spec, n) for n in type(spec).model_fields if n not in ("run_id", "store", "cluster", "sample")}
    perf = _REPO / "docs" / "performance.md"
    try:
        res = plan({n: c for n, c in cfgs.items() if c is not None}, PlanOptions(gpu, mfu, price, rows, success_rate,
                   cpu_nodes), corpus, manifests, perf.read_text() if perf.exists() else None)
    except ValueError as e:
        fail(str(e))
    if as_json:
        console.print_json(json.dumps(res))
        return
    t = Table(title=f"plan {spec.run_id} on {gpu} at ${res['assumptions']['gpu_hour_price']}/GPU-hour")
    for col in ("stage", "samples", "TFLOP/sample", "MFU", "GPUs", "GPU-hours", "days", "bytes", "ckpt", "cost $"):
        t.add_column(col, justify="right")
    for name, s in res["stages"].items():
        fps = s.get("flops_per_sample")
        t.add_row(name, f"{s.get('samples', 0):,}", f"{fps / 1e12:.3g}" if fps else "-",
                  f"{s['mfu']:.0%}" if s.get("mfu") else "-", str(s.get("gpus", "-")), f"{s['gpu_hours']:,.0f}",
                  f"{s['days']:,.1f}", _human(s["bytes"]),
                  _human(s["checkpoint_bytes"]) if "checkpoint_bytes" in s else "-", f"{s['cost']:,.0f}")
    tot = res["total"]
    t.add_row("total", "", "", "", "", f"{tot['gpu_hours']:,.0f}", f"{tot['days']:,.1f}", _human(tot["bytes"]),
              "", f"{tot['cost']:,.0f}")
    console.print(t)
    a = res["assumptions"]
    console.print(f"wall time bound by {tot['bounds_wall_time']}; {a['rows']:,} URL rows ({a['rows_source']}); "
                  f"per-sample figures: {a['corpus']['source']}")
