"""Charts of a service's metrics history, as geometry for the templates to draw in inline SVG.

Pure: points in, numbers and labels out; no I/O and no markup (the template writes the SVG, escaped
as any page). A value that was not measured (None) breaks its line rather than drawing a zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

WIDTH = 600
HEIGHT = 160
# Room for the axis labels inside the drawing.
LEFT = 64
RIGHT = 8
TOP = 10
BOTTOM = 22
# One colour per line, told apart by the legend beside each chart.
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


@dataclass(frozen=True)
class Line:
    label: str
    colour: str
    # SVG path data ("M x y L x y ..."), one run per stretch of measured values.
    path: str
    # Values with no measured neighbour, drawn as dots: (x, y).
    dots: list[tuple[float, float]]
    last: str


@dataclass(frozen=True)
class Chart:
    title: str
    lines: list[Line]
    top_label: str
    start_label: str
    end_label: str
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


Series = tuple[str, list[float | None]]


def _chart(title: str, times: Sequence[datetime], series: Sequence[Series], fmt: Callable[[float], str],
           start: datetime | None = None, end: datetime | None = None, binary: bool = False) -> Chart | None:
    """A chart of ``series`` (label, one value per time) over ``times``, from ``start`` to ``end`` (default:
    the first and the last time); None when no series has a value. ``binary``: the axis' top is a round
    number of KiB, MiB or GiB."""
    values = [v for _, vs in series for v in vs if v is not None]
    if not times or not values:
        return None
    top = _nice(max(values), binary)
    span_x = WIDTH - RIGHT - LEFT
    span_y = HEIGHT - BOTTOM - TOP
    times = [utc(t) for t in times]
    first = utc(start if start is not None else times[0])
    last_time = utc(end if end is not None else times[-1])
    span_t = (last_time - first).total_seconds()

    def x(i: int) -> float:
        if span_t <= 0:
            return LEFT + span_x / 2
        return LEFT + span_x * min(max((times[i] - first).total_seconds() / span_t, 0.0), 1.0)

    def y(v: float) -> float:
        return TOP + span_y * (1 - (v / top if top else 0))

    lines = []
    for k, (label, vs) in enumerate(series):
        parts: list[str] = []
        dots: list[tuple[float, float]] = []
        run: list[tuple[float, float]] = []
        for i, v in enumerate([*vs, None]):
            if v is not None:
                run.append((round(x(i), 1), round(y(v), 1)))
                continue
            if len(run) == 1:
                dots.append(run[0])
            elif run:
                parts.append("M" + " L".join(f"{px} {py}" for px, py in run))
            run = []
        if not parts and not dots:
            continue
        last = next(v for v in reversed(vs) if v is not None)
        lines.append(Line(label, COLOURS[k % len(COLOURS)], " ".join(parts), dots, fmt(last)))
    clock = "%H:%M:%S" if span_t < 600 else "%H:%M"
    return Chart(title, lines, fmt(top), first.strftime(clock), last_time.strftime(clock + " UTC"))


def utc(moment: datetime) -> datetime:
    """``moment`` with a zone: UTC when it has none (as SQLite's times come back)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _nice(value: float, binary: bool = False) -> float:
    """The axis' top: ``value`` rounded up to 1, 2 or 5 times a power of ten (of a power of 1024 when
    ``binary``); 1 for nothing above zero."""
    if value <= 0:
        return 1.0
    if binary:
        unit = 1.0
        while value / unit >= 1024:
            unit *= 1024
        return _nice(value / unit) * unit
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def percent(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def size(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{v:.0f} {unit}" if unit == "B" or abs(v) >= 100 else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def count(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def seconds(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def service_charts(points: Sequence[Any], start: datetime | None = None, end: datetime | None = None) -> list[Chart]:
    """The service page's charts from its metrics points (``MetricPoint``) from ``start`` to ``end``: CPU and
    memory always; requests, latency and GPU from the traffic and GPU fields where the hub measured them."""
    times = [p.at for p in points]

    def field(name: str) -> list[float | None]:
        return [getattr(p, name, None) for p in points]

    def chart(title: str, series: Sequence[Series], fmt: Callable[[float], str]) -> Chart | None:
        return _chart(title, times, series, fmt, start, end, binary=fmt is size)

    drawn = [
        chart("CPU", [("average", field("cpu_percent_avg")), ("max", field("cpu_percent_max"))], percent),
        chart("Memory", [("average", field("memory_bytes_avg")), ("max", field("memory_bytes_max"))], size),
        chart("Requests", [("requests", field("requests")), ("5xx", field("errors_5xx"))], count),
        chart("Latency", [("p50", field("latency_p50_seconds")), ("p95", field("latency_p95_seconds")),
                          ("p99", field("latency_p99_seconds"))], seconds),
        chart("GPU use", [("utilisation", field("gpu_util_percent_avg"))], percent),
        chart("GPU memory", [("max", field("gpu_memory_bytes_max"))], size),
    ]
    return [c for c in drawn if c is not None]
