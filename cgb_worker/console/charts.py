"""Bar charts drawn on the server as inline SVG: the overview reads without JavaScript, a chart costs a few
hundred bytes on a slow link, and the console's CSP (no script at all) stays as strict as it is.

Only numbers and fixed names go into the drawing; every label is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT, AXIS = 720, 140, 18


@dataclass(frozen=True, slots=True)
class Layer:
    """One counter stacked in the bars: its name (in the legend and each bar's title), colour and values."""

    name: str
    colour: str
    values: Sequence[int]


def stacked_bars(starts: Sequence[float], layers: Sequence[Layer], *, step: float, title: str) -> Markup:
    """Bars, one per bucket (``starts``, epoch seconds, each ``step`` long), the layers stacked in order; each
    bar's title gives its time and every layer's count (what a mouse-over shows, and a screen reader reads)."""
    n = len(starts)
    totals = [sum(layer.values[i] for layer in layers) for i in range(n)]
    top = max(totals, default=0) or 1
    slot = WIDTH / max(n, 1)
    plot = HEIGHT - AXIS
    fmt = "%H:%M" if step < 3600 else "%d %H:00"
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 4}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="0" y1="{plot}" x2="{WIDTH}" y2="{plot}" stroke="#999" stroke-width="1"/>',
        f'<text x="2" y="11" font-size="11" fill="#555">{top}</text>',
    ]
    for i, start in enumerate(starts):
        x = i * slot
        y = float(plot)
        when = time.strftime(fmt, time.gmtime(start))
        counts = ", ".join(f"{layer.name} {layer.values[i]}" for layer in layers)
        parts.append(f"<g><title>{escape(when)} UTC: {escape(counts)}</title>")
        parts.append(f'<rect x="{x:.1f}" y="0" width="{slot:.1f}" height="{plot}" fill="transparent"/>')
        for layer in layers:
            v = layer.values[i]
            if v <= 0:
                continue
            h = plot * v / top
            y -= h
            parts.append(
                f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(slot - 1, 1):.1f}" height="{h:.1f}" '
                f'fill="{escape(layer.colour)}"/>'
            )
        parts.append("</g>")
    for i in (0, n // 2, n - 1) if n else ():
        anchor = "start" if i == 0 else "end" if i == n - 1 else "middle"
        x = i * slot + (0 if i == 0 else slot if i == n - 1 else slot / 2)
        label = time.strftime(fmt, time.gmtime(starts[i]))
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT}" font-size="11" fill="#555" text-anchor="{anchor}">{escape(label)}</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><svg width="10" height="10" aria-hidden="true"><rect width="10" height="10" '
        f'fill="{escape(layer.colour)}"/></svg> {escape(layer.name)} {sum(layer.values)}</span>'
        for layer in layers
    )
    return Markup("".join(parts) + f'<div class="legend">{legend}</div>')  # noqa: S704 - built from escaped parts
