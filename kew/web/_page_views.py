"""The page's workers view (alive or stale from their heartbeats, queues,
threads when known, the tasks each runs now) and its charts (tasks per
minute and queue depth, per queue, drawn as SVG on the server)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.params import Parameter

from kew.web._render import PAGE, render
from kew.web._state import web_state
from kew.web._stats import compute_stats
from kew.web._workers import workers_view

#: The windows the charts page offers (minutes).
WINDOWS = (15, 60, 180, 360, 720, 1440)


@get("/ui/workers", include_in_schema=False, opt=PAGE)
async def workers_page(request: Request[Any, Any, Any]) -> Response[str]:
    web = web_state(request.app.state)
    workers = await workers_view(web)
    return render(
        request,
        "workers.html",
        heading="workers",
        workers=workers,
        window=web.config.worker_window,
        alive=sum(1 for w in workers if w.alive),
    )


@get("/ui/charts", include_in_schema=False, opt=PAGE)
async def charts_page(
    request: Request[Any, Any, Any],
    minutes: Annotated[int, Parameter(ge=5, le=1440)] = 180,
) -> Response[str]:
    web = web_state(request.app.state)
    stats = await compute_stats(web, minutes)
    tasks = {s.queue: s for s in stats.tasks}
    depth = {s.queue: s for s in stats.depth}
    names = ["*", *web.app.queue_names()]
    rows = [(name, tasks.get(name), depth.get(name)) for name in names]
    return render(
        request,
        "charts.html",
        heading="charts",
        stats=stats,
        rows=rows,
        minutes=minutes,
        windows=WINDOWS,
        task_queues=set(web.app.queues),
    )


#: The page's workers and charts routes.
VIEW_ROUTES = [workers_page, charts_page]
