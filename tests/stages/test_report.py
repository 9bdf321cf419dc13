"""HTML report: every prompt beside its image; per training stage ticked curves (log-scale loss, lr,
grad norm, throughput, MFU, memory), sample grids across training, config and parameter count;
the evaluation. And what the training logger writes to TensorBoard for them."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re

import pytest
from PIL import Image

from pipeline import store
from stages.report.page import (TRAIN_STAGES, ReportEntry, build_report, loss_curve_svg, make_grid, read_metrics,
                           stage_curves, write_report)


def _write_metrics(run: str, stage: str, n: int, torn: bool = False) -> None:
    lines = [json.dumps({"step": 10 * i, "loss": 1.0 / (i + 1), "grad_norm": 0.5, "lr": 1e-4, "samples_per_s": 9.0})
             for i in range(n)]
    if torn:
        lines.append('{"step": 999, "lo')  # a crashed writer's last line
    store.write_bytes_atomic(store.join(run, stage, "metrics.jsonl"), ("\n".join(lines) + "\n").encode())


def _entries() -> list[ReportEntry]:
    prompts = ["a large red circle in the center on a white background", "cats & <dogs> \"quoted\""]
    out = []
    for i, p in enumerate(prompts):
        for c, colour in (("unclip", (200, 0, 0)), ("imagen", (0, 0, 200))):
            out.append(ReportEntry(p, c, f"{i:03d}_{c}_x.png", Image.new("RGB", (512, 512), colour), note=f"n{i}{c}"))
    return out


def test_report_has_every_prompt_and_one_svg_per_stage_with_metrics(tmp_path):
    run = store.normalize(str(tmp_path / "run"))
    _write_metrics(run, "train_prior", 5)
    _write_metrics(run, "train_base", 7, torn=True)
    _write_metrics(run, "train_sr256", 1)
    store.write_bytes_atomic(store.join(run, "train_decoder", "metrics.jsonl"), b"")  # no rows: no curve
    entries = _entries()
    doc = build_report(entries, run_uri=run, summary_lines=["imagen: demo check: colour 1/2"],
                       config={"steps": 3})
    for e in entries:
        assert html.escape(e.prompt) in doc
        assert f"href='{e.filename}'" in doc
        assert e.note in doc
    # per stage with rows: loss (log y), learning rate, gradient norm, throughput
    assert doc.count("<svg") == 3 * 4
    for stage in ("train_prior", "train_base", "train_sr256"):
        for chart in ("loss", "learning rate", "gradient norm", "throughput"):
            assert f"{stage} {chart} (" in doc
    # the torn line was skipped, the 7 good rows plotted
    assert "train_base loss (7 points)" in doc
    assert "no loss metrics for: train_decoder<" in doc  # in the run, nothing logged; train_sr1024 is not in it
    assert "demo check: colour 1/2" in doc and "&quot;steps&quot;: 3" in doc
    # thumbnails are embedded (self-contained) and downscaled
    thumbs = re.findall(r"src='data:image/png;base64,([^']+)'", doc)
    assert len(thumbs) == len(entries)
    im = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert max(im.size) <= 192 and im.getpixel((5, 5)) == (200, 0, 0)
    assert "<script" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_read_metrics_counts_bad_lines_and_missing_file(tmp_path):
    run = store.normalize(str(tmp_path))
    _write_metrics(run, "train_base", 3, torn=True)
    rows, bad = read_metrics(store.join(run, "train_base", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 10, 20] and bad == 1
    assert read_metrics(store.join(run, "nope", "metrics.jsonl")) == ([], 0)


def test_loss_curve_svg_points_follow_the_data():
    svg = loss_curve_svg([(0, 2.0), (10, 1.0), (20, 0.5)], title="t <x>")
    pts = re.search(r'<polyline[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(pts) == 3
    xs = [float(p.split(",")[0]) for p in pts]
    ys = [float(p.split(",")[1]) for p in pts]
    assert xs == sorted(xs) and ys == sorted(ys)  # x grows, loss falls (SVG y grows downwards)
    # log scale: equal ratios are equal distances (2 -> 1 -> 0.5)
    assert ys[1] - ys[0] == pytest.approx(ys[2] - ys[1], abs=0.15)
    assert 'data-scale="log"' in svg and "t &lt;x&gt;" in svg
    flat = loss_curve_svg([(5, 1.0)], title="one")  # a single point / flat curve still renders
    assert "<polyline" in flat
    with pytest.raises(ValueError, match="at least one point"):
        loss_curve_svg([], title="empty")


def test_stage_curves_uses_given_metric_uris_and_skips_nonfinite(tmp_path):
    other = store.normalize(str(tmp_path / "elsewhere"))
    store.write_bytes_atomic(store.join(other, "m.jsonl"),
                             b'{"step": 1, "loss": NaN}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.25}\n')
    curves = stage_curves(store.normalize(str(tmp_path / "run")), TRAIN_STAGES,
                          {"train_sr1024": store.join(other, "m.jsonl")})
    assert list(curves) == ["train_sr1024"] and "(2 points)" in curves["train_sr1024"]


def test_write_report_to_s3(s3_bucket):
    uri = store.join(s3_bucket, "run", "sample", "report.html")
    doc = build_report(_entries()[:1], run_uri=store.join(s3_bucket, "run"))
    write_report(uri, doc)
    assert store.read_bytes(uri).decode() == doc


def test_grid_has_a_row_per_prompt_and_a_column_per_cascade_image():
    from types import SimpleNamespace as S

    red, blue = Image.new("RGB", (16, 16), (200, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 200))
    samples = [S(prompt=p, cascade=c, k=k, image=red if c == "unclip" else blue)
               for p in ("first prompt", "second prompt with many words that has to wrap onto a second line")
               for c in ("unclip", "imagen") for k in range(2)]
    grid = make_grid(samples, tile=64, label_width=200)
    pad, head = 4, 18
    assert grid.size == (200 + 4 * (64 + pad) + pad, head + 2 * (64 + pad) + pad)
    # tiles upscaled with NEAREST keep their colour; column order follows first appearance
    y = head + pad + (64 + pad) + 32
    assert grid.getpixel((200 + pad + 32, y)) == (200, 0, 0)
    assert grid.getpixel((200 + pad + 3 * (64 + pad) + 32, y)) == (0, 0, 200)


def _ticks(svg: str, axis: str) -> list[str]:
    block = re.search(rf'<g class="{axis}"[^>]*>(.*?)</g>', svg).group(1)
    return re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', block)


def test_axes_have_ticks_log_for_losses_linear_otherwise():
    from stages.report.svg import Series, line_chart_svg, linear_ticks, log_ticks

    pts = [(s, 10 ** (-3 * s / 390)) for s in range(0, 391, 10)]  # 1 down to 1e-3 over 390 steps
    svg = line_chart_svg([Series("loss", pts)], title="loss", log_y=True)
    assert _ticks(svg, "y-axis") == ["1e-3", "0.01", "0.1", "1"]  # decades
    assert _ticks(svg, "x-axis") == ["0", "100", "200", "300", "400"]
    lin = line_chart_svg([Series("lr", [(0, 0.0), (50, 1e-3), (100, 5e-4)])], title="lr")
    assert 'data-scale="linear"' in lin and _ticks(lin, "y-axis")[0] == "0" and _ticks(lin, "y-axis")[-1] == "1e-3"
    assert linear_ticks(20, 300, 4) == [0, 100, 200, 300]
    assert log_ticks(0.0115, 0.25) == [0.02, 0.05, 0.1, 0.2]  # under one decade: 1, 2 and 5 x 10^k
    assert log_ticks(0.0115, 0.9) == [0.03, 0.1, 0.3]  # under two decades: 1 and 3 x 10^k
    assert log_ticks(0.2762, 0.4211) == [0.3, 0.35, 0.4]  # narrower still: linear nice ticks
    # a log axis with nothing > 0 falls back to linear instead of drawing nothing
    assert 'data-scale="linear"' in line_chart_svg([Series("x", [(0, 0.0), (1, -1.0)])], title="t", log_y=True)
    # two series: a legend names both
    two = line_chart_svg([Series("loss", [(1, 1.0), (2, 0.5)]), Series("val_loss", [(2, 0.6)])], title="t", log_y=True)
    assert re.findall(r'data-name="([^"]+)"', two) == ["loss", "val_loss"] and ">val_loss</text>" in two


def _logged_attempt(tmp_path, monkeypatch):
    """A training attempt as the loop leaves it, written by the real MetricsLogger (TensorBoard
    and W&B offline): 4 rows with an MFU meter, a validation row, grids at steps 2 and 4, an
    eval.jsonl as stages/evaluate/follow.py writes it, final weights."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    from stages.training.metrics import MetricsLogger, MfuMeter, image_grid

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = store.normalize(str(tmp_path / "run"))
    attempt = store.join(run, "train_base", "0123456789ab")
    meter = MfuMeter("cpu", "fp32", samples_per_step=4, peak=1e12)  # a CPU has no peak rate: give one
    w, x = torch.randn(64, 64, requires_grad=True), torch.randn(4, 64)
    meter.step(lambda: (x @ w).sum().backward())
    assert meter.flops_per_step == 2 * (2 * 4 * 64 * 64)  # the forward matmul and the grad of w
    logger = MetricsLogger(attempt, enabled=True, resume_step=0, wandb_project="t2i-test", run_name="train_base",
                           mfu=meter)
    for step in range(1, 5):
        logger.log(step, {"loss": 1.0 / step, "grad_norm": 0.5 / step, "lr": 1e-3, "samples_per_s": 8.0})
        if step % 2 == 0:
            logger.image(step, "grid", image_grid(torch.full((2, 3, 8, 8), step / 4 - 0.5)))
    logger.log(4, {"val_loss": 0.3})
    logger.close()
    rows = [{"step": 2, "val_loss_ema": 0.5, "fid": 3.0, "clip_score": 0.1},
            {"step": 4, "val_loss": 0.3, "val_loss_ema": 0.25, "fid": 2.0, "clip_score": 0.2}]
    store.write_bytes_atomic(store.join(attempt, "eval.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    weights = {"a.weight": torch.zeros(10, 20), "a.bias": torch.zeros(20)}
    store.write_bytes_atomic(store.join(attempt, "final", "step_00000004", "model.safetensors"), st_save(weights))
    assert np.isfinite(meter.figures(8.0)["mfu"])
    return run, attempt


def test_logger_groups_scalars_adds_mfu_and_memory_and_logs_grids(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, attempt = _logged_attempt(tmp_path, monkeypatch)
    rows, bad = read_metrics(store.join(attempt, "metrics.jsonl"))
    assert bad == 0 and [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    # 4 samples/step at 8 samples/s: 0.5 s per step of 65536 FLOPs, against a 1 TFLOP/s peak
    assert rows[0]["mfu"] == pytest.approx(65536 / 0.5 / 1e12) and rows[0]["host_peak_rss_gb"] > 0.01
    assert "mfu" not in rows[-1] and rows[-1] == {"step": 4, "val_loss": 0.3}  # a validation-only row
    acc = EventAccumulator(store.local_path(store.join(attempt, "tb")))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/grad_norm", "train/lr", "perf/samples_per_s",
                                          "perf/mfu", "perf/tflops_per_gpu", "memory/host_peak_rss_gb", "val/loss"}
    assert acc.Tags()["images"] == ["samples/grid"] and [e.step for e in acc.Images("samples/grid")] == [2, 4]
    assert [g.rsplit("/", 1)[-1] for g in store.glob(store.join(attempt, "samples", "*.png"))] == \
        ["grid_00000002.png", "grid_00000004.png"]
    # W&B (offline): the same tags and the grids as images
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
    assert b"perf/mfu" in logged and b"val/loss" in logged
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 2


def test_report_shows_grids_eval_curves_and_parameter_count_of_a_logged_attempt(tmp_path, monkeypatch):
    run, attempt = _logged_attempt(tmp_path, monkeypatch)
    doc = build_report([], run_uri=run, stages=("train_base",),
                       metrics_uris={"train_base": store.join(attempt, "metrics.jsonl")})
    for chart in ("loss", "learning rate", "gradient norm", "throughput", "MFU", "peak memory"):
        assert f"train_base {chart} (4 points)" in doc
    loss = re.search(r'<svg[^>]*aria-label="train_base loss[^"]*".*?</svg>', doc).group(0)
    assert 'data-scale="log"' in loss and re.findall(r'data-name="([^"]+)"', loss) == ["loss", "val_loss"]
    grids = re.findall(r"<img class='grid' src='data:image/png;base64,([^']+)'[^>]*><figcaption>step (\d+)<", doc)
    assert [s for _, s in grids] == ["2", "4"]
    assert Image.open(io.BytesIO(base64.b64decode(grids[1][0]))).getpixel((2, 2)) == (191, 191, 191)
    assert "parameters 220 (220)" in doc  # 10x20 + 20, read from the safetensors header
    for title in ("held-out loss per checkpoint", "FID per checkpoint", "CLIP score per checkpoint"):
        assert f"train_base: {title}" in doc
    assert "no finished evaluate stage" in doc


@pytest.mark.slow
def test_report_of_the_smoke_run(smoke_run, tmp_path):
    """The finished smoke run: every stage's duration, every training stage's ticked curves (log
    loss, lr, grad norm), parameter count as its weights file holds it, config; the evaluation."""
    from safetensors import safe_open

    from pipeline import layout
    from pipeline.manifest import read_manifest
    from stages.evaluate import evaluation_rows
    from stages.models import TRAIN_STAGES
    from stages.report.page import refresh_report

    _, run = smoke_run
    trained = [s for s in TRAIN_STAGES if layout.finished_stage_dir(run, s)]  # those the smoke spec has
    assert len(trained) >= 5
    doc = build_report([], run_uri=run)
    table = re.search(r"<table class='stages'>.*?</table>", doc, re.S).group(0)
    for stage in ("download", "embed", *trained, "sample", "evaluate"):
        m = read_manifest(layout.finished_stage_dir(run, stage))
        assert re.search(rf"<td>{stage}</td><td>{m['attempt']}</td><td>finished</td><td>\d[^<]* (s|min)</td>", table), stage
    for stage in trained:
        m = read_manifest(layout.finished_stage_dir(run, stage))
        for chart in ("loss", "learning rate", "gradient norm"):
            svg = re.search(rf'<svg[^>]*aria-label="{stage} {chart} \(4 points\)".*?</svg>', doc).group(0)
            assert len(_ticks(svg, "x-axis")) >= 2 and len(_ticks(svg, "y-axis")) >= 2
            assert ('data-scale="log"' in svg) == (chart != "learning rate")
        with safe_open(store.local_path(m["outputs"]["weights"]), "pt") as f:  # loads the tensors' shapes only
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert f"({n:,})" in re.search(rf"<h3 id='{stage}'>.*?</p>", doc, re.S).group(0)
    assert doc.count("stage config (what the fingerprint covers)") == len(trained)
    assert "&quot;flavor&quot;: &quot;debug&quot;" in doc and "network config (final/config.json)" in doc
    ev = read_manifest(layout.finished_stage_dir(run, "evaluate"))
    shown = re.search(r"<table class='eval'>.*?</table>", doc, re.S).group(0)
    for name, value, meaning in evaluation_rows(ev):  # stages.evaluate's own table, row by row
        assert f"<tr><td>{name}</td><td>{value:.4g}</td><td>{html.escape(meaning)}</td></tr>" in shown

    # The sample stage's own report, its run part rebuilt in place: the sample thumbnails stay.
    sample = read_manifest(layout.finished_stage_dir(run, "sample"))
    copy = store.join(store.normalize(str(tmp_path)), "report.html")
    store.write_bytes_atomic(copy, store.read_bytes(sample["outputs"]["report"]))
    before = store.read_bytes(copy).decode()
    elsewhere = store.join(store.normalize(str(tmp_path)), "evaluate", "report.html")
    assert refresh_report(copy, run, out_uri=elsewhere) == elsewhere and store.read_bytes(copy).decode() == before
    refresh_report(copy, run)
    after = store.read_bytes(copy).decode()
    assert store.read_bytes(elsewhere).decode() == after
    assert after.count("<img src='data:image/png") == before.count("<img src='data:image/png") == 3  # unclip, imagen, glide
    assert "<table class='eval'>" in after and after.split("<h2>Samples</h2>")[0] == before.split("<h2>Samples</h2>")[0]


def test_evaluation_section_puts_cfg_beside_clip_guided_figures():
    """An evaluation sampled with guidance: compare: each <cascade>_clip_guided_<figure> beside its
    CFG figure (counts like demo_n are not compared), and the meaning says which is which."""
    from stages.report.eval_figures import evaluation_rows, guidance_pairs
    from stages.report.run_section import StageView, evaluation_section

    metrics = {"glide_fid": 40.0, "glide_clip_guided_fid": 35.5, "glide_demo_n": 32.0,
               "glide_demo_colour_chance": 0.125, "glide_clip_guided_demo_colour_chance": 0.125,
               "glide_clip_guided_demo_n": 32.0, "glide_demo_colour_accuracy": 0.5,
               "glide_clip_guided_demo_colour_accuracy": 0.75, "heldout_clip_score": 0.3}
    assert guidance_pairs(metrics) == [("glide_demo_colour_accuracy", 0.5, 0.75), ("glide_fid", 40.0, 35.5)]
    meaning = dict((n, m) for n, _, m in evaluation_rows({"metrics": metrics}))
    assert "CLIP-guided" in meaning["glide_clip_guided_fid"] and "CLIP-guided" not in meaning["glide_fid"]
    doc = evaluation_section(StageView("evaluate", "file:///x/evaluate", manifest={"metrics": metrics}), [])
    table = doc[doc.index("Classifier-free vs CLIP guidance"):]
    assert "<tr><td>glide_fid</td><td>40</td><td>35.5</td></tr>" in table
    assert "glide_demo_n" not in table
    plain = evaluation_section(StageView("evaluate", "file:///x/evaluate", manifest={"metrics": {"glide_fid": 4.0}}), [])
    assert "CLIP guidance" not in plain
