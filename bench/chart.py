"""A small SVG bar chart written with plain string formatting (no plotting library)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
PANEL_W = 360
PANEL_H = 228
PLOT_TOP = 40
PLOT_BOTTOM = 200
PLOT_LEFT = 56
PLOT_RIGHT = 340
HEADER_H = 64
FOOTER_H = 22


@dataclass(frozen=True)
class Bar:
    """One bar: a median value, the per-round values as dots, or a text when there is none."""

    label: str
    value: float | None
    color: str
    points: Sequence[float] = ()
    missing: str = "n/a"


@dataclass(frozen=True)
class Panel:
    """One plot: a heading and its bars on a shared y axis starting at zero."""

    heading: str
    bars: Sequence[Bar]
    fmt: Callable[[float], str] = field(default=lambda v: f"{v:,.0f}")


def nice_step(top: float, ticks: int = 4) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) covering `top` in ~`ticks` steps."""
    raw = max(top, 1e-9) / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _text(
    x: float, y: float, text: str, size: int = 11, anchor: str = "middle", **attrs: str
) -> str:
    extra = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in attrs.items())
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' {FONT}{extra}>"
        f"{escape(text)}</text>"
    )


def _axis(
    step: float, y_top: float, scale: Callable[[float], float], fmt: Callable[[float], str]
) -> list[str]:
    parts = []
    n_ticks = int(round(y_top / step))
    for i in range(n_ticks + 1):
        value = i * step
        y = scale(value)
        parts.append(
            f"<line x1='{PLOT_LEFT}' y1='{y:.1f}' x2='{PLOT_RIGHT}' y2='{y:.1f}' "
            f"stroke='{'#444' if i == 0 else '#ddd'}' stroke-width='1'/>"
        )
        parts.append(_text(PLOT_LEFT - 6, y + 4, fmt(value), size=10, anchor="end", fill="#555"))
    return parts


def _bar(
    bar: Bar, x: float, width: float, scale: Callable[[float], float], fmt: Callable[[float], str]
) -> list[str]:
    base = scale(0)
    center = x + width / 2
    parts = [_text(center, PLOT_BOTTOM + 16, bar.label, size=11)]
    if bar.value is None:
        parts.append(
            f"<rect x='{x:.1f}' y='{base - 40:.1f}' width='{width:.1f}' height='40' fill='none' "
            f"stroke='{bar.color}' stroke-dasharray='4 3'/>"
        )
        parts.append(_text(center, base - 16, bar.missing, size=10, fill="#555"))
        return parts
    top = scale(bar.value)
    parts.append(
        f"<rect x='{x:.1f}' y='{top:.1f}' width='{width:.1f}' height='{base - top:.1f}' "
        f"fill='{bar.color}'><title>{escape(bar.label)}: {escape(fmt(bar.value))}</title></rect>"
    )
    for point in bar.points:
        parts.append(
            f"<circle cx='{center:.1f}' cy='{scale(point):.1f}' r='2.5' fill='#fff' "
            f"stroke='#222' stroke-width='1'/>"
        )
    label_y = scale(max([bar.value, *bar.points])) - 7  # above the bar and its dots
    parts.append(_text(center, label_y, fmt(bar.value), size=11, font_weight="bold"))
    return parts


def render_panel(panel: Panel, offset_x: float, offset_y: float) -> str:
    """One panel as an SVG group placed at (offset_x, offset_y)."""
    values = [v for b in panel.bars for v in (b.value, *b.points) if v is not None]
    step = nice_step(max(values, default=1.0) * 1.12)
    y_top = step * math.ceil(max(values, default=1.0) * 1.12 / step)

    def scale(value: float) -> float:
        return PLOT_BOTTOM - (PLOT_BOTTOM - PLOT_TOP) * value / y_top

    parts = [_text(PANEL_W / 2, 20, panel.heading, size=13, font_weight="bold")]
    parts += _axis(step, y_top, scale, panel.fmt)
    slot = (PLOT_RIGHT - PLOT_LEFT) / max(len(panel.bars), 1)
    for i, bar in enumerate(panel.bars):
        parts += _bar(bar, PLOT_LEFT + i * slot + slot * 0.18, slot * 0.64, scale, panel.fmt)
    body = "\n    ".join(parts)
    return f"<g transform='translate({offset_x:.0f},{offset_y:.0f})'>\n    {body}\n  </g>"


def render_svg(title: str, subtitle: str, panels: Sequence[Panel], footer: str = "") -> str:
    """A complete SVG document: a title, then the panels side by side, then a footer line."""
    width = PANEL_W * len(panels)
    height = HEADER_H + PANEL_H + FOOTER_H
    groups = [render_panel(p, i * PANEL_W, HEADER_H) for i, p in enumerate(panels)]
    lines = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>",
        f"  <rect width='{width}' height='{height}' fill='#fff'/>",
        "  " + _text(width / 2, 24, title, size=15, font_weight="bold"),
        "  " + _text(width / 2, 44, subtitle, size=11, fill="#555"),
        *("  " + g for g in groups),
        "  " + _text(width / 2, height - 8, footer, size=10, fill="#555"),
        "</svg>",
    ]
    return "\n".join(lines) + "\n"
