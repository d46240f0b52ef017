"""The page's rendering: the Jinja2 environment (autoescaped templates in
``kew/web/templates``), its helpers, and what every page's template gets
(the root path every link starts with, the session's CSRF token, whether
the visitor may act)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import jinja2
from litestar import Request, Response

from kew.web._state import identity, web_state
from kew.web._svg import depth_chart, task_chart
from kew.web.auth import Sessions

HTML = "text/html; charset=utf-8"
#: ``opt`` of a page route: a visitor without a session goes to the login form.
PAGE: dict[str, Any] = {"page": True}
#: ``opt`` of a page route that changes something (admin; CSRF checked by the guard).
PAGE_ADMIN: dict[str, Any] = {"page": True, "scope": "admin"}


def when(ms: int | None) -> str:
    """Epoch ms as a UTC time for people."""
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int | None) -> str:
    """How long ago epoch ms was (``12 s ago``, ``3 min ago``)."""
    if not ms:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def n(value: int) -> str:
    return "?" if value < 0 else str(value)


env = jinja2.Environment(
    loader=jinja2.PackageLoader("kew.web", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
env.globals.update(when=when, ago=ago, n=n, task_chart=task_chart, depth_chart=depth_chart)


def page_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """What every template gets: title, root path, CSRF token, who."""
    web = web_state(request.app.state)
    session = web.sessions.get(request.cookies.get(Sessions.COOKIE))
    who = identity(request)
    return {
        "title": web.config.title,
        "heading": "",
        "nav": True,
        "root": web.config.root_path,
        "csrf": session.csrf if session is not None else "",
        "who": who,
        "admin": who is not None and who.scope == "admin",
    }


def render_text(request: Request[Any, Any, Any], name: str, **context: Any) -> str:
    return env.get_template(name).render(**{**page_context(request), **context})


def render(
    request: Request[Any, Any, Any], name: str, status: int = 200, **context: Any
) -> Response[str]:
    """The template ``name`` as an HTML response (never cached)."""
    return Response(
        render_text(request, name, **context),
        media_type=HTML,
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )
