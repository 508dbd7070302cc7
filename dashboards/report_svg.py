"""Small inline SVG line charts for the HTML report: no plotting dependency, no scripts.

Every text that reaches the markup goes through :func:`html.escape`.

Examples:
    >>> svg = line_chart({"a<b": [(0, 1.0), (60, 3.0)]}, start=0, end=60)
    >>> svg.startswith("<svg") and "a&lt;b" in svg and "<script" not in svg
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape

__all__ = ["PALETTE", "line_chart"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_W, _H, _L, _R, _T, _B = 560, 170, 52, 10, 8, 22


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%H:%M")


def _num(v: float) -> str:
    return f"{v:.3g}"


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, start: float, end: float,
               label: str = "") -> str:
    """One SVG polyline per series (at most ``len(PALETTE)``) over ``[start, end]`` with a legend.

    Points are ``(unix_seconds, value)``; non-finite values are skipped.
    """
    clean = {name: [(t, v) for t, v in pts if math.isfinite(v)] for name, pts in list(series.items())[:len(PALETTE)]}
    values = [v for pts in clean.values() for _, v in pts]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo = min(lo, 0.0)
    hi = hi if hi > lo else lo + 1.0
    span = max(end - start, 1e-9)

    def xy(t: float, v: float) -> str:
        x = _L + (_W - _L - _R) * (min(max(t, start), end) - start) / span
        y = _T + (_H - _T - _B) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    out = [(f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
            f'role="img" aria-label="{escape(label)}">'),
           f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" fill="#fafafa" stroke="#ccc"/>',
           f'<text x="{_L - 4}" y="{_T + 10}" text-anchor="end" font-size="10">{escape(_num(hi))}</text>',
           f'<text x="{_L - 4}" y="{_H - _B}" text-anchor="end" font-size="10">{escape(_num(lo))}</text>',
           f'<text x="{_L}" y="{_H - 6}" font-size="10">{escape(_clock(start))}</text>',
           f'<text x="{_W - _R}" y="{_H - 6}" text-anchor="end" font-size="10">{escape(_clock(end))} UTC</text>']
    for colour, (name, pts) in zip(PALETTE, clean.items(), strict=False):
        pts = sorted(pts)
        if len(pts) == 1:
            x, y = xy(*pts[0]).split(",")
            out.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"><title>{escape(name)}</title></circle>')
        elif pts:
            line = " ".join(xy(t, v) for t, v in pts)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}">'
                       f'<title>{escape(name)}</title></polyline>')
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{c}"></i>{escape(n)}</span>'
                     for c, n in zip(PALETTE, clean, strict=False))
    return "".join(out) + f'<div class="legend">{legend}</div>'
