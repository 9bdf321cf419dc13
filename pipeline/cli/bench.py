"""``t2i bench train | loader | embed | download | checkpoint | scale``: speed figures, each a ratio measured in one run.

The benchmarks live next to what they measure (stages/bench/train_step.py, stages/bench/loader.py,
data_prep/bench/embed.py) and import neither Ray nor this CLI; this file only parses options
and prints tables. Heavy imports happen inside the commands so ``t2i --help`` stays fast.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import nullcontext
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import console, resolve_run
from pipeline.cli.common import fail as _fail
from pipeline.store import normalize
from stages.models import ROLES

bench_app = typer.Typer(no_args_is_help=True, help="Measure speed: training step, embedding, loader.")

_STAGES = " | ".join(ROLES)  # the bench names a stage by its model role


def _zeros(spec: str) -> tuple[int, ...]:
    try:
        zeros = tuple(int(z) for z in spec.split(",") if z.strip())
    except ValueError:
        _fail(f"--zero must be comma-separated ZeRO stages among 0,1,2,3 (got {spec!r})")
    bad = [z for z in zeros if z not in (0, 1, 2, 3)]
    if bad:
        _fail(f"--zero must be comma-separated ZeRO stages among 0,1,2,3 (got {spec!r})")
    return zeros


def _table(title: str, rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows[1:]:
        t.add_row(*r)
    return t


def _spread(series: dict[str, list]) -> dict[str, dict[str, float]]:
    """min / median / max of each named series (None values, e.g. a failed run, left out)."""
    import statistics

    out = {}
    for name, xs in series.items():
        xs = [float(x) for x in xs if x is not None]
        if xs:
            out[name] = {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}
    return out


def _print_spread(what: str, series: dict[str, list], repeats: int) -> None:
    if repeats < 2:
        return
    for name, s in _spread(series).items():
        console.print(f"{name} {what} over {repeats} repeats: min {s['min']:.4g}, median {s['median']:.4g}, "
                      f"max {s['max']:.4g}")


@bench_app.command("train")
def bench_train_cmd(
    stage: str = typer.Option("base", help=_STAGES),
    flavor: str = typer.Option("debug", help="debug, demo or the role's paper-scale flavor (t2i flavors)"),
    zero: str = typer.Option("2", help="DeepSpeed ZeRO stage(s) to compare with plain PyTorch, e.g. 2 or 0,2,3"),
    batch: int = typer.Option(4, "--batch-size", help="micro-batch size (the same for every run)"),
    steps: int = typer.Option(5, "--steps", help="timed steps per run"),
    warmup: int = typer.Option(2, help="untimed warm-up steps per run"),
    repeats: int = typer.Option(1, "--repeats", help="measure this many times; print min/median/max"),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)"),
    precision: str = typer.Option("auto", help="bf16 | fp32 | auto (bf16 on GPU)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network"),
    channels_last: bool = typer.Option(False, "--channels-last", help="UNet in channels_last memory format"),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="recompute activations"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is steadiest on a busy CPU)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Training step: samples/s, step time, peak memory, FLOPs, MFU; DeepSpeed / plain ratio."""
    from stages.bench.train_step import BenchOptions, bench_train, format_table  # torch: t2i --help must not load it

    if precision not in ("auto", "bf16", "fp32"):
        _fail(f"--precision must be auto, bf16 or fp32 (got {precision!r})")
    try:
        results = [bench_train(stage, flavor, zero_stages=_zeros(zero), batch=batch, steps=steps, warmup=warmup,
                               device=device, threads=threads,
                               options=BenchOptions(compile, channels_last, activation_checkpointing, precision))
                   for _ in range(max(1, repeats))]
    except ValueError as e:
        _fail(str(e))
    res = results[-1]
    spread = {f"{r['mode']}{'-zero' + str(r['zero']) if r.get('zero') is not None else ''}":
              [(x["runs"][i].get("step_s") or 0) * 1e3 or None for x in results] for i, r in enumerate(res["runs"])}
    if as_json:
        console.print_json(json.dumps({**res, "repeats": len(results), "step_ms_spread": _spread(spread)}))
        return
    peak = f"{res['peak_tflops']:.0f} TFLOP/s peak" if res["peak_tflops"] else "no peak rate known: no MFU"
    console.print(_table(f"bench train {stage}/{flavor} batch {batch} on {res['device_name']} ({peak})",
                         format_table(res)))
    console.print(f"params {res['runs'][0]['params']:,}; DS/plain = DeepSpeed step time / plain step time "
                  f"(targets: ZeRO-2 <= 1.10, ZeRO-3 <= 1.30)")
    _print_spread("step ms", spread, len(results))


@bench_app.command("loader")
def bench_loader_cmd(
    stage: str = typer.Option("base", help=_STAGES),
    flavor: str = typer.Option("debug", help="flavor whose image size and step rate to use"),
    batch: int = typer.Option(4, "--batch-size", help="micro-batch size"),
    workers: int = typer.Option(1, help="DataLoader worker processes (the stage's loader_workers)"),
    batches: int = typer.Option(20, "--steps", help="timed loader batches"),
    repeats: int = typer.Option(1, "--repeats", help="measure this many times; print min/median/max"),
    run: Optional[str] = typer.Option(None, help="read an existing run's download/ + embed/ instead of synthetic shards"),
    zero: Optional[int] = typer.Option(None, help="measure the step with DeepSpeed at this ZeRO stage (default: plain)"),
    device: Optional[str] = typer.Option(None, help="device of the training step"),
    source_size: Optional[int] = typer.Option(None, help="synthetic JPEGs' size (default: the flavor's; LAION spec: 1024)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Training-loader samples/s against the training step's consumption (target >= 3x)."""
    from stages.bench.loader import bench_loader, format_result  # torch: t2i --help must not load it

    run_uri = None
    if run:
        run_uri = resolve_run(run)
    try:
        results = [bench_loader(stage, flavor, batch=batch, workers=workers, batches=batches, run_uri=run_uri,
                                device=device, step_zero=zero, source_size=source_size)
                   for _ in range(max(1, repeats))]
    except ValueError as e:
        _fail(str(e))
    res, spread = results[-1], {"loader/step": [r["loader_over_step"] for r in results]}
    if as_json:
        console.print_json(json.dumps({**res, "repeats": len(results), "loader_over_step_spread": _spread(spread)}))
        return
    console.print(format_result(res))
    _print_spread("ratio", spread, len(results))


@bench_app.command("embed")
def bench_embed_cmd(
    model_size: str = typer.Option("tiny", help="tiny | vit-l-14+t5-xxl (random weights, real shapes)"),
    batch_size: int = typer.Option(16, "--batch-size", help="encoder batch size"),
    num_batches: int = typer.Option(4, "--steps", help="timed batches"),
    repeats: int = typer.Option(1, "--repeats", help="measure this many times; print min/median/max"),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda if available)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Embedding end to end (decode -> encode -> write) against the raw encoder forward (target >= 0.8x)."""
    from data_prep.bench.embed import MODEL_SIZES, bench_embed, format_result  # torch: t2i --help must not load it

    if model_size not in MODEL_SIZES:
        _fail(f"--model-size must be one of {', '.join(MODEL_SIZES)} (got {model_size!r})")
    try:
        results = [bench_embed(model_size, batch_size, num_batches, device) for _ in range(max(1, repeats))]
    except ValueError as e:
        _fail(str(e))
    res, spread = results[-1], {"e2e/raw": [r["e2e_over_raw"] for r in results]}
    if as_json:
        console.print_json(json.dumps({**res, "repeats": len(results), "e2e_over_raw_spread": _spread(spread)}))
        return
    console.print(format_result(res))
    _print_spread("ratio", spread, len(results))


@bench_app.command("download")
def bench_download_cmd(
    images: int = typer.Option(512, help="images in the served list"),
    image_px: int = typer.Option(256, help="side of the served JPEGs"),
    image_size: int = typer.Option(64, help="stored image size (download.image_size)"),
    processes: int = typer.Option(1, help="img2dataset processes (the same for both runs)"),
    threads: int = typer.Option(16, help="img2dataset threads per process"),
    repeats: int = typer.Option(1, "--repeats", help="measure this many times; print min/median/max"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """The download stage end to end against raw img2dataset on the same served list (target >= 0.9x)."""
    from data_prep.bench.download import bench_download, format_result  # heavy: the download stage, run by this command

    try:
        res = bench_download(images, image_px, processes, threads, image_size, repeats)
    except ValueError as e:
        _fail(str(e))
    console.print_json(json.dumps(res)) if as_json else console.print(format_result(res))


@bench_app.command("checkpoint")
def bench_checkpoint_cmd(
    stage: str = typer.Option("base", help=_STAGES),
    flavor: str = typer.Option("debug", help="network size"),
    steps: int = typer.Option(60, "--steps", help="timed training steps per mode"),
    every: int = typer.Option(30, "--every", help="save a checkpoint every N steps (longer than an upload)"),
    zero: int = typer.Option(2, "--zero", help="ZeRO stage of the engine"),
    mbps: float = typer.Option(20.0, "--mbps", help="the store link's bandwidth, MB/s each way (the proxy's throttle)"),
    latency_ms: float = typer.Option(20.0, "--latency-ms", help="added latency per connection to the store"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """A save's step-time overhead, synchronous vs background upload, to moto's S3 server behind a
    throttling proxy on 127.0.0.1 (target: background >= 5x cheaper), and what a background save holds."""
    from pipeline.cli.slow_proxy import remote_like_s3  # heavy: moto (the test extra), loaded when run
    from stages.bench.checkpoint import bench_checkpoint, format_result  # torch: t2i --help must not load it

    try:
        with remote_like_s3(mbps, latency_ms) as bucket:
            res = bench_checkpoint(bucket, stage, flavor, steps=steps, every=every, zero=zero)
    except ValueError as e:
        _fail(str(e))
    res["link"] = {"mbps": mbps, "latency_ms": latency_ms}
    console.print_json(json.dumps(res)) if as_json else console.print(format_result(res))


@bench_app.command("scale")
def bench_scale_cmd(
    shards: str = typer.Option("2000,20000", "--shards", help="comma-separated shard counts, e.g. 2000,20000"),
    store_kind: str = typer.Option("file", "--store", help="file (a temp folder) | s3 (moto's S3 server on 127.0.0.1)"),
    root: Optional[str] = typer.Option(None, "--root", help="file store folder to build in (default: a temp folder)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Control plane at N shards: status, planning, manifest, embed resume, loader pairing, checkpoint listing."""
    from pipeline.cli.bench_scale import OPERATIONS, bench_scale, moto_store  # heavy: benchmark code, loaded when run

    try:
        sizes = [int(s) for s in shards.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 2 for n in sizes):
        _fail(f"--shards must be comma-separated shard counts >= 2, e.g. 2000,20000 (got {shards!r})")
    if store_kind not in ("file", "s3"):
        _fail(f"--store must be file or s3 (got {store_kind!r})")
    tmp = None
    if store_kind == "file" and root is None:
        tmp = root = tempfile.mkdtemp(prefix="t2i-scale-")
    say = (lambda m: None) if as_json else (lambda m: console.print(f"[dim]{m}[/]"))
    try:
        with moto_store() if store_kind == "s3" else nullcontext(normalize(root)) as uri:
            res = bench_scale(sizes, uri, progress=say)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        console.print_json(json.dumps(res))
        return
    head = ["operation"] + [f"{n} shards (s)" for n in sizes] + ([f"growth (x{res['shards_ratio']:g} shards)"]
                                                                 if len(sizes) > 1 else [])
    rows = [head]
    for op in OPERATIONS:
        k = f"{op}_s"
        rows.append([op] + [f"{res['results'][str(n)][k]:.3f}" for n in sizes]
                    + ([f"{res['growth'][k]:.1f}x"] if len(sizes) > 1 else []))
    console.print(_table(f"bench scale on the {store_kind} store", rows))
