"""Line charts as inline SVG for report.html: real axes with tick labels, log or linear y.

No matplotlib (not a dependency) and no JavaScript: the report must open offline, from object
storage or a copied folder, so every chart is a few hundred bytes of SVG text. A loss falls by
orders of magnitude in the first hundred steps; on a linear axis everything after that is a flat
line at the bottom, so losses are drawn on a log axis (``log_y``) with ticks at 1, 2, 5 x 10^k.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_FONT = 'font-family="sans-serif"'


@dataclass
class Series:
    """One line of a chart: (x, y) points, drawn in order of x."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str = ""


def fmt_tick(v: float) -> str:
    """A short tick label: 0.001 -> '1e-3', 2500 -> '2500', 1.5e6 -> '1.5e6', 0.25 -> '0.25'."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-2:
        m, e = f"{v:.1e}".split("e")
        return f"{m.removesuffix('.0')}e{int(e)}"
    return f"{v:.4g}"


def linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """'Nice' ticks (1, 2 or 5 x 10^k apart), about ``target`` of them, from the last tick at or
    below ``lo`` to the first at or above ``hi``: the axis spans them, so both ends are labelled."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over [lo, hi] (both > 0): the decades; else 1 and 3 x 10^k; else 1, 2
    and 5 x 10^k, the first set with three ticks inside. A range narrower than that (0.28..0.42)
    gets linear nice ticks, placed on the log axis; the ends only if even those are too few."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 3), (1, 2, 5)):
        ticks = [float(f"{m}e{k}") for k in range(k0, k1 + 1) for m in mults]
        inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(inside) >= 3:
            return inside
    inside = [t for t in linear_ticks(lo, hi) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return inside if len(inside) >= 2 else [lo, hi]


def _clean(points: Sequence[tuple[float, float]], log_y: bool) -> list[tuple[float, float]]:
    out = []
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y):
            out.append((float(x), float(y)))
    return sorted(out)


def line_chart_svg(series: Sequence[Series], *, title: str, x_label: str = "step", y_label: str = "",
                   log_y: bool = False, width: int = 380, height: int = 210) -> str:
    """An SVG chart of one or more series with ticked axes and a legend when there are several.
    ``log_y`` falls back to a linear axis when no point is > 0 (a log axis could show nothing)."""
    if log_y and not any(p[1] > 0 and math.isfinite(p[1]) for s in series for p in s.points):
        log_y = False
    lines = [(s, _clean(s.points, log_y)) for s in series]
    lines = [(s, pts) for s, pts in lines if pts]
    if not lines:
        raise ValueError(f"line_chart_svg({title!r}) needs at least one point")
    pad_l, pad_r, pad_t, pad_b = 56, 12, 24, 38
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    xs = [p[0] for _, pts in lines for p in pts]
    ys = [p[1] for _, pts in lines for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = min(ys), max(ys)
    if log_y:
        if y1 / y0 < 1.0001:  # flat: one decade around it keeps the line visible
            y0, y1 = y0 / 3.0, y1 * 3.0
        ty = log_ticks(y0, y1)
        margin = 10 ** (0.04 * math.log10(y1 / y0))  # points on the frame would hide behind it
        y0, y1 = y0 / margin, y1 * margin
        f = math.log10
    else:
        if y1 == y0:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
        ty = linear_ticks(y0, y1)
        y0, y1 = ty[0], ty[-1]

        def f(v: float) -> float:
            return v

    tx = linear_ticks(x0, x1, target=4)
    x0, x1 = tx[0], tx[-1]
    fy0, fy1 = f(y0), f(y1)

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return pad_t + (1.0 - (f(v) - fy0) / (fy1 - fy0)) * ph

    t = html.escape(title)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{t}">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" font-size="12" {_FONT}>{t}</text>',
           f'<g class="y-axis" data-scale="{"log" if log_y else "linear"}" font-size="10" {_FONT}>']
    for v in ty:
        y = sy(v)
        out.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + pw}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<line x1="{pad_l - 4}" y1="{y:.1f}" x2="{pad_l}" y2="{y:.1f}" stroke="#888"/>'
                   f'<text class="tick" x="{pad_l - 6}" y="{y + 3:.1f}" text-anchor="end">{fmt_tick(v)}</text>')
    out.append("</g>")
    out.append(f'<g class="x-axis" font-size="10" {_FONT}>')
    for v in tx:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{pad_t + ph}" x2="{x:.1f}" y2="{pad_t + ph + 4}" stroke="#888"/>'
                   f'<text class="tick" x="{x:.1f}" y="{pad_t + ph + 15}" text-anchor="middle">{fmt_tick(v)}</text>')
    out.append("</g>")
    out.append(f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{pad_l + pw / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="10" {_FONT}>'
               f'{html.escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="11" y="{pad_t + ph / 2:.0f}" text-anchor="middle" font-size="10" {_FONT} '
                   f'transform="rotate(-90 11 {pad_t + ph / 2:.0f})">{html.escape(y_label)}</text>')
    for i, (s, pts) in enumerate(lines):
        color = s.color or PALETTE[i % len(PALETTE)]
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" data-name="{html.escape(s.name, quote=True)}" fill="none" '
                   f'stroke="{color}" stroke-width="1.5" points="{poly}"/>')
        if len(pts) <= 24:  # sparse series (validation, per-checkpoint figures): show each point
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    if len(lines) > 1:
        for i, (s, _) in enumerate(lines):
            color = s.color or PALETTE[i % len(PALETTE)]
            y = pad_t + 10 + 12 * i
            out.append(f'<line x1="{pad_l + pw - 90}" y1="{y - 3}" x2="{pad_l + pw - 76}" y2="{y - 3}" '
                       f'stroke="{color}" stroke-width="2"/><text x="{pad_l + pw - 72}" y="{y}" font-size="10" '
                       f'{_FONT}>{html.escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
