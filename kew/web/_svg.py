"""Charts as inline SVG, drawn on the server (no script, no library).

A chart is a ``<figure>``: a legend in HTML, an SVG that stretches to its
card's width (``preserveAspectRatio="none"``, strokes that do not scale),
and the time axis in HTML below it, so it stays legible from a phone to a
wide screen.  Its data attributes (``data-kind``, ``data-queue``,
``data-total``) let a test or a script read what it shows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from markupsafe import Markup, escape

from kew.web.history import DepthPoint, TaskPoint

W, H, PAD = 600, 120, 6

Series = tuple[str, str, list[tuple[int, int]]]  # css key, label, (at ms, value)


def _nice(v: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``v`` (>= 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= v:
                return m * step
        step *= 10


def _hhmm(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M")


def _figure(
    kind: str,
    queue: str,
    label: str,
    series: Sequence[Series],
    since: int,
    until: int,
    *,
    totals: bool,
    empty: str,
) -> Markup:
    span = max(1, until - since)
    values = [v for _, _, pts in series for _, v in pts]
    top = _nice(max([1, *values]))
    total = sum(v for v in values if v > 0)
    count = max((len(pts) for _, _, pts in series), default=0)

    def x(t: int) -> str:
        return f"{min(W, max(0.0, (t - since) / span * W)):.1f}"

    def y(v: int) -> str:
        return f"{H - PAD - max(v, 0) / top * (H - 2 * PAD):.1f}"

    legend, lines = [], []
    for key, name, pts in series:
        shown = sum(max(v, 0) for _, v in pts) if totals else (pts[-1][1] if pts else 0)
        legend.append(
            f'<span class="key k-{key}"><i></i>{escape(name)} '
            f'<b data-series="{key}">{"?" if shown < 0 else shown}</b></span>'
        )
        if len(pts) == 1:  # one sample: a dot (a zero-length line with round caps)
            ((t, v),) = pts
            lines.append(
                f'<line class="k-{key} dot" data-series="{key}" x1="{x(t)}" x2="{x(t)}" '
                f'y1="{y(v)}" y2="{y(v)}" vector-effect="non-scaling-stroke"/>'
            )
        elif pts:
            coords = " ".join(f"{x(t)},{y(v)}" for t, v in pts)
            lines.append(
                f'<polyline class="k-{key}" data-series="{key}" points="{coords}" '
                'vector-effect="non-scaling-stroke"/>'
            )
    grid = "".join(
        f'<line class="grid" x1="0" x2="{W}" y1="{y(round(top * f))}" y2="{y(round(top * f))}" '
        'vector-effect="non-scaling-stroke"/>'
        for f in (0, 0.5, 1)
    )
    what = "totals over the window" if totals else "latest values"
    note = "" if count else f'<div class="chart-empty">{escape(empty)}</div>'
    mid = since + span // 2
    return Markup(
        f'<figure class="chart" data-kind="{kind}" data-queue="{escape(queue)}" '
        f'data-total="{total}" data-points="{count}">'
        f'<figcaption><span class="chart-title">{escape(label)}</span>'
        f'<span class="legend" title="{what}">{"".join(legend)}</span></figcaption>'
        f'<div class="plot"><span class="ymax">{top}</span>'
        f'<svg viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(label)}">{grid}{"".join(lines)}</svg>{note}</div>'
        f'<div class="axis"><span>{_hhmm(since)}</span><span>{_hhmm(mid)}</span>'
        f"<span>{_hhmm(until)} UTC</span></div></figure>"
    )


def task_chart(
    points: Sequence[TaskPoint], since: int, until: int, queue: str = "*", label: str = ""
) -> Markup:
    """Tasks started, succeeded and failed per bucket (a point mid-bucket)."""
    width = points[1].at - points[0].at if len(points) > 1 else 60_000
    mid = width // 2
    per = f"{width // 60_000} min" if width != 60_000 else "minute"
    series: list[Series] = [
        ("started", "started", [(p.at + mid, p.started) for p in points]),
        ("succeeded", "succeeded", [(p.at + mid, p.succeeded) for p in points]),
        ("failed", "failed", [(p.at + mid, p.failed) for p in points]),
    ]
    return _figure(
        "tasks",
        queue,
        label or f"Tasks per {per}",
        series,
        since,
        until,
        totals=True,
        empty="no tasks in this window",
    )


def depth_chart(
    points: Sequence[DepthPoint],
    since: int,
    until: int,
    queue: str = "*",
    label: str = "",
    every: float = 0,
) -> Markup:
    """A queue's ready, in-flight, delayed and dead messages, as sampled."""
    series: list[Series] = [
        ("ready", "ready", [(p.at, p.ready) for p in points]),
        ("in_flight", "in flight", [(p.at, p.in_flight) for p in points]),
        ("delayed", "delayed", [(p.at, p.delayed) for p in points]),
        ("dead", "dead", [(p.at, p.dead) for p in points]),
    ]
    return _figure(
        "depth",
        queue,
        label or "Queue depth",
        series,
        since,
        until,
        totals=False,
        empty=f"no samples yet (one every {every:g} s)" if every else "no samples yet",
    )
