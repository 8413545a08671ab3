"""Bar charts as inline SVG, drawn on the server: no JavaScript library, nothing to load.

Readable without colour: every bar has its value in a tooltip (`<title>`), the largest value
labels the scale, and the chart is followed by the same numbers as a table for screen readers
and keyboard users (a `<details>` element).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH = 800
HEIGHT = 240
LEFT = 8
BOTTOM = 24
TOP = 18
_ids = itertools.count(1)


def bar_chart(
    points: Sequence[tuple[str, float]],
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:.1f}",
) -> Markup:
    """`points`: (label, value) pairs in order; `fmt` writes a value for people."""
    chart_id = f"chart-{next(_ids)}"
    peak = max((value for _, value in points), default=0.0)
    scale = peak if peak > 0 else 1.0
    slot = (WIDTH - LEFT * 2) / max(1, len(points))
    bar = max(2.0, slot * 0.7)
    plot = HEIGHT - BOTTOM - TOP
    label_every = max(1, -(-len(points) // 7))  # at most 7 labels: they must not overlap
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-t" focusable="false">',
        f'<title id="{chart_id}-t">{escape(title)}</title>',
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - LEFT}" y2="{HEIGHT - BOTTOM}" '
        'class="axis"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - LEFT}" y2="{TOP}" class="grid"/>',
        f'<text x="{LEFT}" y="{TOP - 5}" class="scale">max {escape(fmt(peak))}</text>',
    ]
    for index, (label, value) in enumerate(points):
        height = plot * (value / scale)
        x = LEFT + index * slot + (slot - bar) / 2
        y = HEIGHT - BOTTOM - height
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{height:.1f}">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>"
        )
        if index % label_every == 0:
            centre = min(max(x + bar / 2, 40.0), WIDTH - 40.0)  # keep edge labels whole
            parts.append(
                f'<text x="{centre:.1f}" y="{HEIGHT - 8}" class="label" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</svg>")
    rows = "".join(
        f"<tr><th scope='row'>{escape(label)}</th><td>{escape(fmt(value))}</td></tr>"
        for label, value in points
    )
    table = (
        f'<details class="chart-data"><summary>{escape(title)}: the numbers</summary>'
        f'<table><thead><tr><th scope="col">Day</th><th scope="col">Value</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></details>"
    )
    return Markup('<figure class="chart-box">' + "".join(parts) + table + "</figure>")


def hours_per_day(days: Sequence[object], title: str) -> Markup:
    """A chart of `DayUsage`-like items (`.day`, `.seconds`), written as durations."""
    from offload.server.web import formats

    points = [(formats.day(d.day), d.seconds / 3600) for d in days]  # type: ignore[attr-defined]
    return bar_chart(points, title, lambda hours: formats.duration(hours * 3600))


def spend_per_day(days: Sequence[object], title: str) -> Markup:
    """A chart of `MonthDay`-like items (`.day`, `.spent_cents`): on-demand spend so far."""
    from offload.server.web import formats

    points = [(formats.day(d.day), d.spent_cents) for d in days]  # type: ignore[attr-defined]
    return bar_chart(points, title, formats.money)


def minutes_per_day(days: Sequence[object], title: str) -> Markup:
    from offload.server.web import formats

    points = [(formats.day(d.day), d.used_minutes) for d in days]  # type: ignore[attr-defined]
    return bar_chart(points, title, lambda minutes: formats.duration(minutes * 60))
