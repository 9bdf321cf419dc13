"""HTML report: every prompt beside its image; per training stage ticked curves (log-scale loss, lr,
grad norm, throughput, MFU, memory), sample grids across training, config and parameter count;
the evaluation. And what the training logger writes to TensorBoard for them."""
from __future__ import annotations

import base64
import html
import io
import json
import re

import pytest
from PIL import Image

from pipeline import store
from stages.report import (TRAIN_STAGES, ReportEntry, build_report, loss_curve_svg, make_grid, read_metrics,
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
    assert "no loss metrics for: train_decoder, train_sr1024" in doc
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
    from stages.report_svg import Series, line_chart_svg, linear_ticks, log_ticks

    pts = [(s, 10 ** (-3 * s / 390)) for s in range(0, 391, 10)]  # 1 down to 1e-3 over 390 steps
    svg = line_chart_svg([Series("loss", pts)], title="loss", log_y=True)
    assert _ticks(svg, "y-axis") == ["1e-3", "0.01", "0.1", "1"]  # decades
    assert _ticks(svg, "x-axis") == ["0", "100", "200", "300", "400"]
    lin = line_chart_svg([Series("lr", [(0, 0.0), (50, 1e-3), (100, 5e-4)])], title="lr")
    assert 'data-scale="linear"' in lin and _ticks(lin, "y-axis")[0] == "0" and _ticks(lin, "y-axis")[-1] == "1e-3"
    assert linear_ticks(20, 300, 4) == [0, 100, 200, 300]
    assert log_ticks(0.0115, 0.25) == [0.02, 0.05, 0.1, 0.2]  # under one decade: 1, 2 and 5 x 10^k
    assert log_ticks(0.0115, 0.9) == [0.03, 0.1, 0.3]  # under two decades: 1 and 3 x 10^k
    assert log_ticks(0.31, 0.39) == [0.31, 0.39]  # no nice tick inside: the ends
    # a log axis with nothing > 0 falls back to linear instead of drawing nothing
    assert 'data-scale="linear"' in line_chart_svg([Series("x", [(0, 0.0), (1, -1.0)])], title="t", log_y=True)
    # two series: a legend names both
    two = line_chart_svg([Series("loss", [(1, 1.0), (2, 0.5)]), Series("val_loss", [(2, 0.6)])], title="t", log_y=True)
    assert re.findall(r'data-name="([^"]+)"', two) == ["loss", "val_loss"] and ">val_loss</text>" in two
