"""A small, dependency-free SVG line chart: throughput over time per stage, for `conflux bench`."""

from __future__ import annotations

import itertools
from html import escape

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
WIDTH, HEIGHT, MARGIN = 900, 420, 60


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], *, x_label: str = "seconds",
               y_label: str = "records/s") -> str:
    points = [point for values in series.values() for point in values]
    max_x = max((x for x, _ in points), default=1.0) or 1.0
    max_y = max((y for _, y in points), default=1.0) or 1.0
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def sx(x: float) -> float:
        return MARGIN + x / max_x * plot_w

    def sy(y: float) -> float:
        return HEIGHT - MARGIN - y / max_y * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for step in range(6):
        y_value, x_value = max_y * step / 5, max_x * step / 5
        parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{sy(y_value):.1f}" y2="{sy(y_value):.1f}" '
                     f'stroke="#ddd"/><text x="{MARGIN - 6}" y="{sy(y_value) + 4:.1f}" text-anchor="end">'
                     f'{y_value:,.0f}</text>')
        parts.append(f'<text x="{sx(x_value):.1f}" y="{HEIGHT - MARGIN + 18}" text-anchor="middle">'
                     f'{x_value:.1f}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="16" y="{HEIGHT / 2}" transform="rotate(-90 16 {HEIGHT / 2})" text-anchor="middle">'
                 f'{escape(y_label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<rect x="{WIDTH - MARGIN - 170}" y="{MARGIN + index * 18 - 10}" width="12" height="12" '
                     f'fill="{colour}"/><text x="{WIDTH - MARGIN - 152}" y="{MARGIN + index * 18}">'
                     f'{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def rates(samples: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Cumulative counts sampled over time -> (time, rate) between consecutive samples."""
    out = []
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t1 > t0:
            out.append((t1, max(0.0, (c1 - c0) / (t1 - t0))))
    return out
