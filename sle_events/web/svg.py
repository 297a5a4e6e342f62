"""Trend plots as inline SVG, drawn on the server (no script, no library): one lab's course over clinical time
with the transplant and the visits marked. Values are placed by their signed decimal (no rounding first)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 34


def _day(when: datetime | date) -> float:
    """Days since the epoch (a date: its midnight, UTC)."""
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day, tzinfo=UTC)
    return when.timestamp() / 86400


def _date(day: float) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).date().isoformat()


def _fmt(value: Decimal) -> str:
    text = format(value.normalize(), "f") if value == value.to_integral() else f"{value:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def trend_svg(
    title: str,
    unit: str,
    points: Sequence[tuple[Any, str, str, str | None]],
    *,
    transplant: date | None = None,
    visits: Sequence[tuple[datetime, str]] = (),
    plot_id: str = "plot",
) -> Markup:
    """An SVG line plot of (occurred_at, value, unit, flag) points; flagged values are drawn as squares."""
    if not points:
        return Markup("")
    xs = [_day(p[0]) for p in points]
    ys = [Decimal(p[1]) for p in points]
    marks = [(_day(at), code) for at, code in visits]
    tx = _day(transplant) if transplant is not None else None
    x_lo, x_hi = min(xs + [m[0] for m in marks] + ([tx] if tx is not None else [])), max(xs + [m[0] for m in marks])
    if x_hi - x_lo < 1:
        x_hi = x_lo + 1
    y_lo, y_hi = min(ys), max(ys)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    pad = (y_hi - y_lo) / 10
    y_lo, y_hi = y_lo - pad, y_hi + pad
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return round(LEFT + (x - x_lo) / (x_hi - x_lo) * w, 1)

    def py(y: Decimal) -> float:
        return round(TOP + float((y_hi - y) / (y_hi - y_lo)) * h, 1)

    out = [
        f'<svg class="trend" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{plot_id}-t {plot_id}-d" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
        f'<title id="{plot_id}-t">{escape(title)} ({escape(unit)})</title>',
        f'<desc id="{plot_id}-d">{len(points)} results from {escape(points[0][0].date().isoformat())} to '
        f"{escape(points[-1][0].date().isoformat())}; latest {escape(_fmt(ys[-1]))} {escape(unit)}</desc>",
        f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" class="plot-area"/>',
    ]
    for y in (y_lo + pad, (y_lo + y_hi) / 2, y_hi - pad):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{py(y)}" y2="{py(y)}" class="grid"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4}" class="axis" text-anchor="end">{escape(_fmt(y))}</text>')
    for x, code in marks:
        out.append(
            f'<line x1="{px(x)}" x2="{px(x)}" y1="{TOP}" y2="{TOP + h}" class="visit"><title>visit '
            f"{escape(code)}</title></line>"
        )
    if marks:  # label a few visits, not all 30: they would overlap
        step = max(1, len(marks) // 6)
        for x, code in marks[::step]:
            out.append(f'<text x="{px(x)}" y="{HEIGHT - 18}" class="axis" text-anchor="middle">{escape(code)}</text>')
    if tx is not None:
        out.append(f'<line x1="{px(tx)}" x2="{px(tx)}" y1="{TOP}" y2="{TOP + h}" class="transplant"/>')
        out.append(f'<text x="{px(tx) + 4}" y="{TOP + 12}" class="axis tx-label">AlloMSC</text>')
    out.append(
        f'<text x="{LEFT}" y="{HEIGHT - 4}" class="axis">{escape(_date(x_lo))}</text>'
        f'<text x="{LEFT + w}" y="{HEIGHT - 4}" class="axis" text-anchor="end">{escape(_date(x_hi))}</text>'
    )
    path = " ".join(f"{px(x)},{py(y)}" for x, y in zip(xs, ys, strict=True))
    out.append(f'<polyline points="{path}" class="series"/>')
    for (at, value, _unit, flag), x, y in zip(points, xs, ys, strict=True):
        tip = f"{at.date().isoformat()}: {value} {unit}" + (f" ({flag})" if flag else "")
        if flag:
            out.append(
                f'<rect x="{px(x) - 3.5}" y="{py(y) - 3.5}" width="7" height="7" class="point flagged">'
                f"<title>{escape(tip)}</title></rect>"
            )
        else:
            out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="3" class="point"><title>{escape(tip)}</title></circle>')
    out.append("</svg>")
    return Markup("".join(out))
