"""Inline SVG charts drawn on the server: no chart library, no CDN, nothing for the browser to fetch.

A chart is a few hundred bytes of ``<polyline>``; the pages embed them directly, so
they also show with JavaScript off.  Values are escaped; the output is trusted markup.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["line_chart", "bar_chart", "PALETTE"]

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer():  # counts read as counts: 8, not 8.0
        return f"{int(v)}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def line_chart(series: Mapping[str, Sequence[tuple[float, float | None]]], *, title: str, unit: str = "",
               width: int = 560, height: int = 180, markers: Sequence[float] = (),
               threshold: float | None = None) -> str:
    """Lines over time (x = UNIX seconds); ``markers`` draws red ticks (alarms) at those times."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    left, right, top, bottom = 44, 10, 22, 22
    w, h = width - left - right, height - top - bottom
    out = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{left}" y="14" class="chart-title">{escape(title)}{" (" + escape(unit) + ")" if unit else ""}'
           '</text>']
    if not pts:
        out.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" class="chart-empty">'
                   'no data yet</text></svg>')
        return "".join(out)
    xs = [p[0] for p in pts] + list(markers)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    if threshold is not None:
        y1 = max(y1, threshold)
    y1 = y1 if y1 > y0 else y0 + 1.0
    x1 = x1 if x1 > x0 else x0 + 1.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h

    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="chart-bg"/>')
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" class="chart-grid"/>'
                   f'<text x="{left - 4}" y="{py(yv) + 4:.1f}" text-anchor="end" class="chart-axis">{_fmt(yv)}</text>')
    out.append(f'<text x="{left}" y="{height - 6}" class="chart-axis">{_clock(x0)}</text>'
               f'<text x="{left + w}" y="{height - 6}" text-anchor="end" class="chart-axis">{_clock(x1)}</text>')
    if threshold is not None:
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{py(threshold):.1f}" y2="{py(threshold):.1f}" '
                   'class="chart-threshold"/>')
    for m in markers:
        out.append(f'<line x1="{px(m):.1f}" x2="{px(m):.1f}" y1="{top + h - 6}" y2="{top + h}" class="chart-alarm"/>')
    legend_x = left + 7 * (len(title) + len(unit)) + 30  # on the title line, clear of the plot
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s if y is not None and math.isfinite(y))
        if coords:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{coords}"/>')
            if coords.count(" ") == 0:  # one point: a dot, or nothing would show
                cx, cy = coords.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
        if len(series) > 1:
            out.append(f'<text x="{legend_x}" y="14" fill="{color}" class="chart-legend">{escape(name)}</text>')
            legend_x += 8 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, width: int = 360) -> str:
    """Horizontal bars (label, value), e.g. devices per model version."""
    row, left = 22, 110
    height = 24 + row * max(1, len(items))
    vmax = max([v for _, v in items] + [1.0])
    out = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="4" y="14" class="chart-title">{escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = 22 + i * row
        bw = (width - left - 40) * value / vmax
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" class="chart-axis">{escape(label)}</text>'
                   f'<rect x="{left}" y="{y + 2}" width="{bw:.1f}" height="{row - 6}" fill="{color}"/>'
                   f'<text x="{left + bw + 4:.1f}" y="{y + 13}" class="chart-axis">{_fmt(value)}</text>')
    out.append("</svg>")
    return "".join(out)
