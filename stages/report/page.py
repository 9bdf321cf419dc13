"""A self-contained HTML report of a run: the samples beside their prompts, then what every
stage did (stages/report/run_section.py: durations, parameter counts, curves of loss, validation loss, lr,
grad norm, throughput and memory, sample grids across training, configs, the evaluation); plus
grid.png, the same samples as one captioned image.

Self-contained on purpose: the report is often opened from object storage or copied off a
cluster, so it carries its own thumbnails (base64 PNG) and its charts as inline SVG
(stages/report/svg.py; no matplotlib, no JavaScript, no network). Each thumbnail links to the
full-size PNG by a relative name, which resolves when the report sits next to the PNGs
(``<run>/sample/``). The run part sits between two markers, so :func:`refresh_report` can
rebuild it in place once later stages (evaluate) have finished.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from pipeline import layout, store
from stages.models import TRAIN_STAGES
from stages.report.run_section import points_of, read_metrics, run_sections  # noqa: F401  (read_metrics: re-exported)
from stages.report.svg import Series, line_chart_svg

THUMB_SIZE = 192
RUN_BEGIN, RUN_END = "<!-- t2i:run-sections -->", "<!-- /t2i:run-sections -->"


@dataclass
class ReportEntry:
    """One sample as the report shows it."""

    prompt: str
    cascade: str
    filename: str  # relative to the report (the PNG written next to it)
    image: Image.Image
    note: str = ""  # e.g. the demo check's verdict for this sample


@dataclass
class Table:
    """A small table shown under the summary lines (e.g. `guidance: compare`'s CFG vs CLIP guidance)."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    note: str = ""


def table_html(t: Table) -> str:
    esc = html.escape
    out = [f"<h2>{esc(t.title)}</h2>"]
    if t.note:
        out.append(f"<p class='muted'>{esc(t.note)}</p>")
    out.append("<table class='compare'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in t.rows]
    out.append("</table>")
    return "".join(out)


def loss_curve_svg(points: Sequence[tuple[float, float]], *, title: str, width: int = 380,
                   height: int = 210) -> str:
    """An inline SVG chart of (step, loss) points: ticked axes, log-scale y (stages/report/svg.py)."""
    if not points:
        raise ValueError(f"loss_curve_svg({title!r}) needs at least one point")
    return line_chart_svg([Series("loss", points)], title=title, y_label="loss", log_y=True, width=width,
                          height=height)


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
        uri = (metrics_uris or {}).get(stage) or store.join(run_uri, stage, layout.METRICS)
        pts = points_of(read_metrics(uri)[0], "loss")
        if pts:
            out[stage] = loss_curve_svg(pts, title=f"{stage} loss ({len(pts)} points)")
    return out


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:6px;vertical-align:top}
td.prompt{max-width:22em}img{image-rendering:pixelated;display:block}
.curves,.grids{display:flex;flex-wrap:wrap;gap:12px}.muted{color:#777}.note{font-size:11px;color:#555}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}figure{margin:0}
figcaption{font-size:11px;color:#555;text-align:center}img.grid{max-width:256px}
details{margin:4px 0}summary{cursor:pointer;color:#357}
"""


def build_report(entries: Sequence[ReportEntry], *, run_uri: str, title: str = "t2i samples",
                 summary_lines: Sequence[str] = (), config: dict[str, Any] | None = None,
                 stages: Sequence[str] = TRAIN_STAGES,
                 metrics_uris: dict[str, str] | None = None, tables: Sequence[Table] = ()) -> str:
    """The report as one HTML string: a table (one row per prompt, one column per cascade), the
    summary lines (e.g. the demo check), ``tables``, the run's stages (stages/report/run_section.py), the sampling
    config. ``metrics_uris``: stage -> its attempt's metrics.jsonl (the attempts the samples
    came from); stages not given are found through the run's ``_CURRENT.json`` pointers."""
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
    parts += [table_html(t) for t in tables]

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

    parts += [RUN_BEGIN, run_sections(run_uri, stages, metrics_uris), RUN_END]

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
    side = max(max(s.image.size) for s in samples)
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
                # fitted into the tile as it is: a 16:9 sample stays 16:9, centred (a square fills it)
                w, h = s.image.size
                scale = tile / max(w, h)
                fit = (max(1, round(w * scale)), max(1, round(h * scale)))
                resample = Image.Resampling.NEAREST if max(w, h) < tile else Image.Resampling.LANCZOS
                grid.paste(s.image.resize(fit, resample), (label_width + pad + j * (tile + pad) + (tile - fit[0]) // 2,
                                                           y + (tile - fit[1]) // 2))
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


def refresh_report(uri: str, run_uri: str, *, stages: Sequence[str] = TRAIN_STAGES,
                   metrics_uris: dict[str, str] | None = None, out_uri: str | None = None) -> str:
    """Rebuild the run part of an existing report.html (e.g. once the evaluate stage, which runs
    beside sample, has finished); the samples part is kept as it was written. Written back in
    place, or to ``out_uri`` (a later stage's own copy, leaving the sample stage's outputs as its
    manifest lists them). Returns the URI written."""
    doc = store.read_bytes(uri).decode("utf-8")
    a, b = doc.find(RUN_BEGIN), doc.find(RUN_END)
    if a < 0 or b < a:
        raise ValueError(f"{uri} has no run part to refresh (written by an older release): re-run its sample stage")
    fresh = doc[: a + len(RUN_BEGIN)] + "\n" + run_sections(run_uri, stages, metrics_uris) + "\n" + doc[b:]
    return write_report(out_uri or uri, fresh)


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
