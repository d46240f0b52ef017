"""kew.web's errors: the exception types routes raise (each documented in
the OpenAPI document through the route's ``raises``), and the handlers
that turn them into responses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.response import Redirect
from litestar.types import ExceptionHandlersMap

from kew.web import validate
from kew.web._state import web_state


class BadBody(ClientException):
    """400; documented through Litestar's own 400 (ValidationException),
    which every route with parameters lists: one 400 schema per route."""

    status_code = 400
    detail = "the body is not valid JSON"


class BadValue(ClientException):
    """422: the body is JSON but not of the expected type."""

    status_code = 422
    detail = "the body does not fit the queue's type"


class TooLarge(ClientException):
    """413: the body (or the message made of it) is too large."""

    status_code = 413
    detail = "the request body is larger than the maximum"


class Unavailable(HTTPException):
    """503: the broker cannot take the request now (with ``Retry-After``)."""

    status_code = 503
    detail = "the broker is unavailable or the queue is full; retry later"


class Unauthorized(NotAuthorizedException):
    """401: no token, or not a known one."""

    detail = "a bearer token is required"


class Forbidden(PermissionDeniedException):
    """403: a ``read`` token on a route that needs ``admin``."""

    detail = "this needs a token with the admin scope"


class CsrfRefused(PermissionDeniedException):
    """403: a request that changes something, made with the page's session
    cookie, without the session's CSRF token (``X-CSRF-Token`` or ``csrf``)."""

    detail = "this request needs the page session's CSRF token"


class NoSuchQueue(NotFoundException):
    """404: the app has no queue of that name."""

    detail = "no such queue"


#: What every route behind a token may answer besides its own errors.
AUTH_ERRORS: list[type[HTTPException]] = [Unauthorized]
#: The same for routes that need the ``admin`` scope.
ADMIN_ERRORS: list[type[HTTPException]] = [Unauthorized, Forbidden]


class LoginRequired(Exception):
    """A page was asked for without a session: go to the login form."""


def invalid(bad: validate.Invalid) -> ClientException:
    """The error to raise for a body :func:`kew.web.validate.parse` refused:
    :class:`BadBody` (not JSON) or :class:`BadValue`, listing the reasons."""
    return (BadBody if bad.status == 400 else BadValue)(extra=bad.reasons)


def to_login(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Handler of :class:`LoginRequired`: redirect to the login form (under
    the configured root path)."""
    return Redirect(web_state(request.app.state).link("/ui/login"))


def problem(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Errors as JSON whatever the route's own media type (Litestar's shape:
    status_code, detail, extra)."""
    body: dict[str, Any] = {"status_code": exc.status_code, "detail": exc.detail}
    if exc.extra:
        body["extra"] = exc.extra
    return Response(
        body, status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


#: The application's exception handlers.
EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    LoginRequired: to_login,
    HTTPException: problem,
}
