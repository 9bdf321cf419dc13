"""A small, self-contained HTML report of a run: the samples beside their prompts, and the loss
curve of every training stage; plus grid.png, the same samples as one captioned image.

Self-contained on purpose: the report is often opened from object storage or copied off a
cluster, so it carries its own thumbnails (base64 PNG) and its charts as inline SVG polylines
(no matplotlib, no JavaScript, no network). Each thumbnail links to the full-size PNG by a
relative name, which resolves when the report sits next to the PNGs (``<run>/sample/``).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from pipeline import store

TRAIN_STAGES = ("train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024")
THUMB_SIZE = 192


@dataclass
class ReportEntry:
    """One sample as the report shows it."""

    prompt: str
    cascade: str
    filename: str  # relative to the report (the PNG written next to it)
    image: Image.Image
    note: str = ""  # e.g. the demo check's verdict for this sample


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


def _finite_points(rows: Iterable[dict[str, Any]], x: str, y: str) -> list[tuple[float, float]]:
    pts = []
    for r in rows:
        try:
            px, py = float(r[x]), float(r[y])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(px) and math.isfinite(py):
            pts.append((px, py))
    return sorted(pts)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def loss_curve_svg(points: Sequence[tuple[float, float]], *, title: str, width: int = 360,
                   height: int = 170) -> str:
    """An inline SVG line chart of (step, loss) points with min/max labels on both axes."""
    if not points:
        raise ValueError(f"loss_curve_svg({title!r}) needs at least one point")
    pad_l, pad_r, pad_t, pad_b = 52, 10, 22, 26
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1.0
    if y1 == y0:  # a flat curve still gets a visible line, drawn in the middle
        y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return pad_t + (1.0 - (v - y0) / (y1 - y0)) * ph

    poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    t = html.escape(title)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{t}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>'
        f'<text x="{width / 2:.0f}" y="14" text-anchor="middle" font-size="12" font-family="sans-serif">{t}</text>'
        f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{poly}"/>'
        f'<text x="{pad_l - 4}" y="{pad_t + 9}" text-anchor="end" font-size="10" font-family="sans-serif">{_fmt(y1)}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + ph}" text-anchor="end" font-size="10" font-family="sans-serif">{_fmt(y0)}</text>'
        f'<text x="{pad_l}" y="{height - 8}" font-size="10" font-family="sans-serif">step {_fmt(x0)}</text>'
        f'<text x="{pad_l + pw}" y="{height - 8}" text-anchor="end" font-size="10" font-family="sans-serif">{_fmt(x1)}</text>'
        "</svg>"
    )


def _thumb_data_uri(img: Image.Image, size: int = THUMB_SIZE) -> str:
    t = img.convert("RGB")
    if max(t.size) > size:  # thumbnails keep the report small even for 1024px samples
        t = t.copy()
        t.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    t.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stage_curves(run_uri: str, stages: Sequence[str] = TRAIN_STAGES,
                 metrics_uris: dict[str, str] | None = None) -> dict[str, str]:
    """Stage name -> SVG of its loss curve, for every stage whose metrics.jsonl has loss rows."""
    out = {}
    for stage in stages:
        uri = (metrics_uris or {}).get(stage) or store.join(run_uri, stage, "metrics.jsonl")
        rows, _ = read_metrics(uri)
        pts = _finite_points(rows, "step", "loss")
        if pts:
            out[stage] = loss_curve_svg(pts, title=f"{stage} loss ({len(pts)} points)")
    return out


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:6px;vertical-align:top}
td.prompt{max-width:22em}img{image-rendering:pixelated;display:block}
.curves{display:flex;flex-wrap:wrap;gap:12px}.muted{color:#777}.note{font-size:11px;color:#555}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
"""


def build_report(entries: Sequence[ReportEntry], *, run_uri: str, title: str = "t2i samples",
                 summary_lines: Sequence[str] = (), config: dict[str, Any] | None = None,
                 stages: Sequence[str] = TRAIN_STAGES,
                 metrics_uris: dict[str, str] | None = None) -> str:
    """The report as one HTML string: a table (one row per prompt, one column per cascade), the
    summary lines (e.g. the demo check), the loss curves, and the sampling config."""
    esc = html.escape
    cascades: list[str] = []
    by_prompt: dict[str, dict[str, list[ReportEntry]]] = {}
    for e in entries:
        if e.cascade not in cascades:
            cascades.append(e.cascade)
        by_prompt.setdefault(e.prompt, {}).setdefault(e.cascade, []).append(e)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p class='muted'>run: {esc(run_uri)}</p>"]
    for line in summary_lines:
        parts.append(f"<p><b>{esc(line)}</b></p>")

    parts.append("<h2>Samples</h2><table><tr><th>prompt</th>")
    parts += [f"<th>{esc(c)}</th>" for c in cascades]
    parts.append("</tr>")
    for prompt, per_cascade in by_prompt.items():
        parts.append(f"<tr><td class='prompt'>{esc(prompt)}</td>")
        for c in cascades:
            cell = []
            for e in per_cascade.get(c, []):
                cell.append(f"<a href='{esc(e.filename, quote=True)}'><img src='{_thumb_data_uri(e.image)}' "
                            f"alt='{esc(e.prompt, quote=True)}' title='{esc(e.filename, quote=True)} "
                            f"({e.image.width}x{e.image.height})'></a>")
                if e.note:
                    cell.append(f"<div class='note'>{esc(e.note)}</div>")
            parts.append(f"<td>{''.join(cell) or '—'}</td>")
        parts.append("</tr>")
    parts.append("</table>")

    parts.append("<h2>Training loss</h2>")
    curves = stage_curves(run_uri, stages, metrics_uris)
    if curves:
        parts.append("<div class='curves'>" + "".join(f"<div>{svg}</div>" for svg in curves.values()) + "</div>")
    missing = [s for s in stages if s not in curves]
    if missing:
        parts.append(f"<p class='muted'>no loss metrics for: {esc(', '.join(missing))}</p>")

    if config is not None:
        parts.append("<h2>Sampling config</h2><pre>" + esc(json.dumps(config, indent=2, sort_keys=True, default=str))
                     + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def make_grid(samples: Sequence[Any], *, tile: int | None = None, label_width: int = 260) -> Image.Image:
    """grid.png: one row per prompt (its caption on the left), one column per cascade x image.
    ``samples`` have ``prompt``, ``cascade``, ``k`` (which image of the prompt) and ``image``."""
    cols: list[tuple[str, int]] = []
    rows: list[str] = []
    for s in samples:
        if (s.cascade, s.k) not in cols:
            cols.append((s.cascade, s.k))
        if s.prompt not in rows:
            rows.append(s.prompt)
    side = max(s.image.width for s in samples)
    tile = tile or min(256, max(64, side))  # tiny debug samples are scaled up to stay visible
    pad, head = 4, 18
    font = ImageFont.load_default(size=12)
    grid = Image.new("RGB", (label_width + len(cols) * (tile + pad) + pad, head + len(rows) * (tile + pad) + pad),
                     (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for j, (c, k) in enumerate(cols):
        d.text((label_width + pad + j * (tile + pad), 2), c if k == 0 else f"{c} #{k}", fill=(0, 0, 0), font=font)
    at = {(s.prompt, s.cascade, s.k): s for s in samples}
    for i, prompt in enumerate(rows):
        y = head + pad + i * (tile + pad)
        d.multiline_text((pad, y), _wrap(prompt, d, font, label_width - 2 * pad), fill=(0, 0, 0), font=font)
        for j, (c, k) in enumerate(cols):
            s = at.get((prompt, c, k))
            if s is not None:
                resample = Image.Resampling.NEAREST if s.image.width < tile else Image.Resampling.LANCZOS
                grid.paste(s.image.resize((tile, tile), resample), (label_width + pad + j * (tile + pad), y))
    return grid


def _wrap(text: str, d: ImageDraw.ImageDraw, font, width: int) -> str:
    lines, line = [], ""
    for w in text.split():
        cand = f"{line} {w}".strip()
        if line and d.textlength(cand, font=font) > width:
            lines.append(line)
            line = w
        else:
            line = cand
    return "\n".join(lines + [line])


def write_report(uri: str, report_html: str) -> str:
    store.write_bytes_atomic(uri, report_html.encode("utf-8"))
    return uri


def slug(text: str, max_len: int = 48) -> str:
    """Filesystem- and URL-safe name part: lowercase words joined by '-', cut at a word boundary."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(s) > max_len:
        cut = s[: max_len + 1].rfind("-")
        s = s[: cut if cut > 0 else max_len]
    return s or "prompt"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
