"""The run part of report.html: what every stage did, read back from the store.

For each stage: its attempt, duration and counts (from ``_MANIFEST.json``); for each training
stage also the parameter count (from the safetensors header of its weights: what the file holds,
without loading a tensor), the curves of its ``metrics.jsonl`` (loss and validation loss on a log
axis, learning rate, gradient norm, samples/s, MFU and peak memory when logged), the sample grids
the loop wrote every ``sample_every`` steps, and its config. Then the evaluate stage's figures
(stages/report/eval_figures.py) and the per-checkpoint evaluation rows (``eval.jsonl``, written by
stages/evaluate/follow.py) as curves over steps.

Everything is read, nothing is computed from weights, so building the report takes well under a
second on a local run; an unreadable or missing piece is left out with a note, never fatal.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from pipeline import layout, store
from pipeline.manifest import read_manifest
from stages.models import TRAIN_STAGES
from stages.report.eval_figures import evaluation_rows, guidance_pairs, read_rows
from stages.report.svg import Series, line_chart_svg
from stages.training.final_weights import FinalConfig

MAX_GRIDS = 8  # grids shown per stage (evenly spaced, the last always): keeps the report small
GRID_THUMB = 256
_GRID_NAME = re.compile(r"^(?P<name>.+)_(?P<step>\d{8})\.png$")  # layout.train_sample_name
# (metrics.jsonl keys, chart title, y label, log axis): one chart per entry with any finite point
CHARTS: tuple[tuple[tuple[str, ...], str, str, bool], ...] = (
    (("loss", "val_loss"), "loss", "diffusion loss", True),
    (("lr",), "learning rate", "lr", False),
    (("grad_norm",), "gradient norm", "norm (before clipping)", True),
    (("samples_per_s",), "throughput", "samples/s", False),
    (("mfu",), "MFU", "fraction of peak", False),
    (("peak_mem_gb", "host_peak_rss_gb"), "peak memory", "GiB", False),
)
# eval.jsonl keys (stages/evaluate/follow.py) -> (title, log axis)
EVAL_CHARTS = {("val_loss", "val_loss_ema"): ("held-out loss per checkpoint", True),
               ("fid",): ("FID per checkpoint (lower is better)", False),
               ("clip_score",): ("CLIP score per checkpoint", False),
               ("prior_cosine_similarity",): ("prior cosine similarity per checkpoint", False)}


@dataclass
class StageView:
    """What the report knows about one stage of the run."""

    stage: str
    attempt: str | None
    manifest: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_rows: int = 0
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    grids: list[tuple[int, str]] = field(default_factory=list)  # (step, uri)
    params: int | None = None
    final_config: FinalConfig | None = None


def read_metrics(uri: str) -> tuple[list[dict[str, Any]], int]:
    """Rows of a ``metrics.jsonl`` and how many lines were unreadable (a crashed writer can leave a
    torn last line; that must not take the report down)."""
    if not store.exists(uri):
        return [], 0
    rows, bad = [], 0
    for line in store.read_bytes(uri).decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def safetensors_params(uri: str) -> int | None:
    """Parameters a safetensors file holds, from its JSON header alone (8-byte length + header):
    the same count the weights file gives, whatever the flavor table says."""
    try:
        with store.open_uri(uri) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2 ** 20:  # not a safetensors header
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, store.StoreError):
        return None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _attempt_of(run_uri: str, stage: str, metrics_uri: str | None) -> str | None:
    if metrics_uri:  # the sample stage passes its inputs' metrics.jsonl: their folder is the attempt
        return metrics_uri.rsplit("/", 1)[0]
    found = layout.finished_stage_dir(run_uri, stage)
    if found is not None:
        return found
    flat = layout.stage_root(run_uri, stage)
    return flat if store.exists(store.join(flat, layout.METRICS)) else None


def _latest(pattern: str) -> str | None:
    found = sorted(store.glob(pattern))
    return found[-1] if found else None


def collect_stage(run_uri: str, stage: str, metrics_uri: str | None = None) -> StageView:
    """A stage's manifest, and for a training stage its metrics, evaluation rows, grids, size."""
    attempt = _attempt_of(run_uri, stage, metrics_uri)
    view = StageView(stage, attempt)
    if attempt is None:
        return view
    try:
        view.manifest = read_manifest(attempt)
    except (ValueError, store.StoreError):
        view.manifest = None
    if stage not in TRAIN_STAGES:
        return view
    view.rows, view.bad_rows = read_metrics(metrics_uri or store.join(attempt, layout.METRICS))
    try:
        view.eval_rows = read_rows(attempt)
    except ValueError:  # a torn row: the checkpoint curves are left out, the rest still shows
        view.eval_rows = []
    for uri in store.glob(store.join(attempt, layout.TRAIN_SAMPLES, "*.png")):
        m = _GRID_NAME.match(uri.rsplit("/", 1)[-1])
        if m:
            view.grids.append((int(m["step"]), uri))
    view.grids.sort()
    outputs = (view.manifest or {}).get("outputs") or {}
    weights = outputs.get("weights") or _latest(store.join(attempt, layout.FINAL, "step_*", layout.FINAL_WEIGHTS))
    if weights is None:  # still training: the EMA weights of the newest checkpoint have the same tensors
        weights = _latest(store.join(attempt, layout.CHECKPOINTS, "step_*", layout.CHECKPOINT_EMA))
    if weights is not None:
        view.params = safetensors_params(weights)
        cfg_uri = outputs.get("config") or weights.rsplit("/", 1)[0] + "/" + layout.FINAL_CONFIG
        if cfg_uri.endswith(layout.FINAL_CONFIG) and store.exists(cfg_uri):
            try:
                view.final_config = FinalConfig.from_json(store.read_json(cfg_uri), cfg_uri)
            except (ValueError, store.StoreError):  # also DocError: the report shows what it can
                view.final_config = None
    return view


def run_stages(run_uri: str) -> list[str]:
    """The stage folders of a run in pipeline order (download, embed, trainings, sample, evaluate)."""
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in store.listdir(run_uri)]
    order = ("download", "embed", *TRAIN_STAGES, "sample", "evaluate")
    known = [s for s in order if s in names]
    return known + sorted(n for n in names if n not in known and not n.startswith(("_", ".")) and "." not in n
                          and layout.read_current(run_uri, n) is not None)


# ----------------------------------------------------------------------------- formatting
def fmt_count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def points_of(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    pts = []
    for r in rows:
        try:
            x, y = float(r["step"]), float(r[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((x, y))
    return sorted(pts)


def stage_charts(view: StageView) -> list[str]:
    """The SVG charts of one training stage's metrics.jsonl (a chart per CHARTS entry with data)."""
    out = []
    for keys, title, ylabel, log in CHARTS:
        series = [Series(k, pts) for k in keys if (pts := points_of(view.rows, k))]
        if series:
            n = len(series[0].points)
            out.append(line_chart_svg(series, title=f"{view.stage} {title} ({n} points)", y_label=ylabel, log_y=log))
    return out


def eval_charts(view: StageView) -> list[str]:
    out = []
    for keys, (title, log) in EVAL_CHARTS.items():
        series = [Series(k, pts) for k in keys if (pts := points_of(view.eval_rows, k))]
        if series:
            out.append(line_chart_svg(series, title=f"{view.stage}: {title}", log_y=log))
    return out


def _grid_thumb(uri: str) -> str | None:
    try:
        img = Image.open(io.BytesIO(store.read_bytes(uri))).convert("RGB")
    except (OSError, ValueError, store.StoreError):
        return None
    if max(img.size) > GRID_THUMB:
        img.thumbnail((GRID_THUMB, GRID_THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pick_grids(grids: Sequence[tuple[int, str]], k: int = MAX_GRIDS) -> list[tuple[int, str]]:
    """At most ``k`` grids, evenly spaced over training, first and last included."""
    if len(grids) <= k:
        return list(grids)
    idx = sorted({round(i * (len(grids) - 1) / (k - 1)) for i in range(k)})
    return [grids[i] for i in idx]


def _config_block(title: str, doc: Any) -> str:
    body = html.escape(json.dumps(doc, indent=2, sort_keys=True, default=str))
    return f"<details><summary>{html.escape(title)}</summary><pre>{body}</pre></details>"


# ----------------------------------------------------------------------------- sections
def summary_table(views: Sequence[StageView]) -> str:
    esc = html.escape
    rows = ["<table class='stages'><tr><th>stage</th><th>attempt</th><th>status</th><th>duration</th>"
            "<th>counts</th><th>parameters</th><th>headline</th></tr>"]
    for v in views:
        m = v.manifest or {}
        counts = ", ".join(f"{k} {c}" for k, c in sorted((m.get("counts") or {}).items()) if c)  # zeros are noise
        met = m.get("metrics") or {}
        head = ", ".join(f"{k} {met[k]:.4g}" for k in ("final_loss", "val_loss") if isinstance(met.get(k), (int, float)))
        status = "finished" if m else ("in progress" if v.rows else "not finished")
        attempt = (v.attempt or "").rstrip("/").rsplit("/", 1)[-1]
        rows.append(f"<tr><td>{esc(v.stage)}</td><td>{esc(attempt)}</td><td>{status}</td>"
                    f"<td>{esc(fmt_duration(m.get('duration_s')) if m else '—')}</td><td>{esc(counts) or '—'}</td>"
                    f"<td>{fmt_count(v.params) if v.params is not None else '—'}</td><td>{esc(head) or '—'}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def training_section(view: StageView) -> str:
    """One training stage: facts, curves, grids across checkpoints, config."""
    esc = html.escape
    m = view.manifest or {}
    cfg = m.get("config") or {}
    facts = [f"flavor {cfg.get('flavor') or (view.final_config.flavor if view.final_config else '?')}",
             f"parameters {fmt_count(view.params)}" + (f" ({view.params:,})" if view.params else ""),
             f"steps {(m.get('counts') or {}).get('steps', view.rows[-1].get('step') if view.rows else '?')}",
             f"duration {fmt_duration(m.get('duration_s')) if m else '? (not finished)'}"]
    parts = [f"<h3 id='{esc(view.stage, quote=True)}'>{esc(view.stage)}</h3>",
             f"<p class='muted'>{esc(' · '.join(facts))}<br>{esc(view.attempt or '')}</p>"]
    charts = stage_charts(view)
    if charts:
        parts.append("<div class='curves'>" + "".join(f"<div>{c}</div>" for c in charts) + "</div>")
    else:
        parts.append("<p class='muted'>no metrics logged</p>")
    if view.bad_rows:
        parts.append(f"<p class='muted'>{view.bad_rows} unreadable metrics line(s) skipped</p>")
    if view.grids:
        shown = pick_grids(view.grids)
        cells = []
        for step, uri in shown:
            src = _grid_thumb(uri)
            if src:
                cells.append(f"<figure><img class='grid' src='{src}' alt='{esc(view.stage)} step {step}'>"
                             f"<figcaption>step {step}</figcaption></figure>")
        note = "" if len(shown) == len(view.grids) else f" ({len(shown)} of {len(view.grids)} shown)"
        parts.append(f"<h4>Samples across training{note}</h4><p class='muted'>each grid: samples of the live "
                     "weights (top) above the real images of the same conditioning</p>"
                     f"<div class='grids'>{''.join(cells)}</div>")
    if cfg:
        parts.append(_config_block("stage config (what the fingerprint covers)",
                                   {**cfg, **{f"extent.{k}": v for k, v in (m.get("extent") or {}).items()}}))
    if view.final_config and view.final_config.network:
        parts.append(_config_block("network config (final/config.json)", view.final_config.network))
    return "".join(parts)


def evaluation_section(evaluate: StageView | None, trainings: Sequence[StageView]) -> str:
    esc = html.escape
    parts = ["<h2>Evaluation</h2>"]
    if evaluate is not None and evaluate.manifest:
        rows = evaluation_rows(evaluate.manifest)
        parts.append("<table class='eval'><tr><th>figure</th><th>value</th><th>meaning</th></tr>"
                     + "".join(f"<tr><td>{esc(n)}</td><td>{v:.4g}</td><td>{esc(mean)}</td></tr>" for n, v, mean in rows)
                     + "</table>")
        pairs = guidance_pairs(evaluate.manifest.get("metrics") or {})
        if pairs:  # sampling.guidance: compare
            parts.append("<h3>Classifier-free vs CLIP guidance (same captions, same seeds)</h3>"
                         "<table class='eval'><tr><th>figure</th><th>classifier-free</th><th>CLIP-guided</th></tr>"
                         + "".join(f"<tr><td>{esc(n)}</td><td>{a:.4g}</td><td>{b:.4g}</td></tr>" for n, a, b in pairs)
                         + "</table>")
        counts = evaluate.manifest.get("counts") or {}
        if counts:
            parts.append(f"<p class='muted'>{esc(', '.join(f'{k} {v}' for k, v in sorted(counts.items())))}</p>")
    else:
        parts.append("<p class='muted'>no finished evaluate stage when this report was written "
                     "(sample and evaluate run side by side)</p>")
    curves = [c for v in trainings for c in eval_charts(v)]
    if curves:
        parts.append("<h3>Per checkpoint (eval.jsonl)</h3><div class='curves'>"
                     + "".join(f"<div>{c}</div>" for c in curves) + "</div>")
    return "".join(parts)


def run_sections(run_uri: str, stages: Sequence[str] = TRAIN_STAGES,
                 metrics_uris: dict[str, str] | None = None) -> str:
    """Stages table, one section per training stage in ``stages``, the evaluation."""
    metrics_uris = metrics_uris or {}
    names = run_stages(run_uri) if store.exists(run_uri) else []
    names += [s for s in stages if s not in names and s in metrics_uris]
    views = {s: collect_stage(run_uri, s, metrics_uris.get(s)) for s in dict.fromkeys([*names, *stages])}
    trainings = [views[s] for s in stages]
    parts = ["<h2>Stages</h2>", summary_table([v for s, v in views.items() if s in names or v.rows])]
    parts.append("<h2>Training</h2>")
    empty = [v.stage for v in trainings if not v.rows and v.attempt is not None]  # in the run, nothing logged
    for v in trainings:
        if v.rows or v.grids:
            parts.append(training_section(v))
    if empty:
        parts.append(f"<p class='muted'>no loss metrics for: {html.escape(', '.join(empty))}</p>")
    parts.append(evaluation_section(views.get("evaluate"), trainings))
    return "\n".join(parts)
