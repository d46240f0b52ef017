"""The OpenAPI document: its configuration, and what Litestar cannot derive
from the handlers (request bodies read raw, with the task types' JSON
schemas; bearer security on every operation but ``/health``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    Reference,
    RequestBody,
    SecurityScheme,
    Server,
)

from kew.web._apidoc import HtmlDocs
from kew.web._queues import DeadLetterIds
from kew.web.backend import TaskApp


def openapi_config(title: str, root_path: str = "") -> OpenAPIConfig:
    """The document at ``/schema/openapi.json``, an HTML reference of it at
    ``/schema`` (rendered on the server: no CDN), with the bearer scheme;
    its server is the root path."""
    components = Components(
        security_schemes={
            "bearer": SecurityScheme(type="http", scheme="bearer", description="read or admin")
        },
    )
    return OpenAPIConfig(
        title=f"{title} task API",
        version="1",
        path="/schema",
        components=components,
        servers=[Server(url=root_path or "/")],
        render_plugins=[HtmlDocs()],
    )


def response_spec(tp: Any, description: str) -> ResponseSpec:
    """An extra documented response of a route, with a body of type ``tp``."""
    return ResponseSpec(data_container=tp, description=description)


def _schema_name(tp: Any) -> str:
    """The component name of a task type's schema (``Task_<type>`` when the
    type has none of its own, e.g. ``int``)."""
    (top,), components = msgspec.json.schema_components([tp], ref_template="{name}")
    name = top.get("$ref")
    if isinstance(name, str) and name in components:
        return name
    return f"Task_{getattr(tp, '__name__', 'body')}"


def _schemas(types: Sequence[Any]) -> dict[str, Any]:
    """JSON schemas of the task types, as OpenAPI components (raw dicts:
    Litestar passes them through into the document)."""
    out: dict[str, Any] = {}
    for tp in types:
        (top,), components = msgspec.json.schema_components(
            [tp], ref_template="#/components/schemas/{name}"
        )
        out.update(components)
        if "$ref" not in top:
            out[_schema_name(tp)] = top
    return out


def _body(name: str, required: bool, description: str) -> RequestBody:
    ref = Reference(ref=f"#/components/schemas/{name}")
    return RequestBody(
        content={"application/json": OpenAPIMediaType(schema=ref)},
        required=required,
        description=description,
    )


def complete_openapi(asgi: Litestar, app: TaskApp) -> None:
    """Add the request bodies Litestar cannot see (the submit routes read
    the raw body to report every validation error; the dead-letter routes
    take an optional one), with the task types' JSON schemas."""
    doc = asgi.openapi_schema
    schemas = doc.components.schemas
    schemas.update(_schemas([tq.type for tq in app.queues.values()] + [DeadLetterIds]))

    paths = doc.paths or {}
    for path, path_item in paths.items():  # every operation needs a token but /health
        ops = (path_item.get, path_item.post, path_item.delete, path_item.head)
        for op in ops:
            if op is not None and path != "/health":
                op.security = [{"bearer": []}]
    for name, tq in app.queues.items():
        item = paths.get(f"/queues/{name}/tasks")
        if item is not None and item.post is not None:
            item.post.request_body = _body(_schema_name(tq.type), True, "the task, validated")
    for action in ("requeue", "purge"):
        item = paths.get(f"/queues/{{queue}}/dead/{action}")
        if item is not None and item.post is not None:
            item.post.request_body = _body(
                "DeadLetterIds", False, "which dead letters (all when there is no body)"
            )
