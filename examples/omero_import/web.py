"""The HTTP front end: ``POST /ome/import`` and the import status URIs.

``POST /ome/import`` takes a JSON array of import requests and answers
``[{"statusUri": ..., "targetUri": ...}, ...]`` (one per request, in order),
or ``400 {"errors": [...]}`` with every reason it is refused.
``GET /ome/import/{id}`` is the status URI: the import's log as text (the
importer's output, every attempt), with its status in the ``X-Kew-Status``
header; ``?format=json`` gives the status document with the log.  Like
Smuggler's, these two need no token: the status URI is a random 128-bit id.

The monitoring API and page (``/queues``, ``/tasks/...``, ``/metrics``, the
admin page) are kew.web's, on the same server, behind its bearer tokens.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio.to_thread
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from .request import InvalidRequest
from .service import OmeroImportService


class ImportStatus(msgspec.Struct, frozen=True, rename="camel"):
    id: str
    status: str
    attempt: int
    output: str
    last_error: str = ""
    next_at: int | None = None


def import_routes(svc: OmeroImportService, base_url: str | None = None) -> list[HTTPRouteHandler]:
    """The routes of the import service, to add to any Litestar app."""

    @post(
        "/ome/import",
        status_code=200,
        summary="Queue a batch of OMERO imports",
        opt={"scope": "public"},
        tags=["omero"],
    )
    async def submit_imports(request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        base = base_url or str(request.base_url)
        try:
            out = await anyio.to_thread.run_sync(svc.submit, body, base)
        except InvalidRequest as e:
            return Response({"errors": e.errors}, status_code=400)
        return Response(msgspec.to_builtins(out))

    @get(
        "/ome/import/{task_id:str}",
        summary="An import's log and status",
        opt={"scope": "public"},
        tags=["omero"],
    )
    async def import_status(
        task_id: Annotated[str, Parameter(description="the import's id (from its statusUri)")],
        format: Annotated[
            Literal["text", "json"], Parameter(description="text: the log; json: status and log")
        ] = "text",
    ) -> Response[Any]:
        record = await anyio.to_thread.run_sync(svc.app.status, task_id)
        if record is None:
            return Response(
                {"errors": [f"no import {task_id!r}"]},
                status_code=404,
                media_type="application/json",
            )
        text, _ = await anyio.to_thread.run_sync(svc.app.output, task_id)
        headers = {"X-Kew-Status": record.status, "Cache-Control": "no-cache"}
        if format == "json":
            doc = ImportStatus(
                record.id, record.status, record.attempt, text, record.last_error, record.next_at
            )
            return Response(msgspec.to_builtins(doc), headers=headers)
        return Response(text, media_type="text/plain", headers=headers)

    return [submit_imports, import_status]


_INT_OR_STRING: dict[str, Any] = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]}
SCHEMAS: dict[str, Any] = {
    "OmeroImportRequest": {
        "type": "object",
        "description": "One import (Smuggler's fields; any value may be sent as a string)",
        "required": ["experimenterEmail", "targetUri", "omeroHost", "sessionKey"],
        "additionalProperties": False,
        "properties": {
            "experimenterEmail": {"type": "string", "description": "who is told the outcome"},
            "targetUri": {
                "type": "string",
                "description": "file:// URI (mount points apply), absolute or relative path",
            },
            "omeroHost": {"type": "string"},
            "omeroPort": {**_INT_OR_STRING, "description": "default 4064"},
            "sessionKey": {"type": "string", "description": "an OMERO session key (secret)"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "datasetId": {**_INT_OR_STRING, "description": "not with screenId"},
            "screenId": {**_INT_OR_STRING, "description": "not with datasetId"},
            "textAnnotations": {
                "oneOf": [
                    {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    },
                    {"type": "string"},
                ],
                "description": "[[namespace, text], ...]",
            },
            "annotationIds": {
                "oneOf": [{"type": "array", "items": _INT_OR_STRING}, {"type": "string"}]
            },
        },
    },
    "OmeroImportQueued": {
        "type": "object",
        "required": ["statusUri", "targetUri"],
        "properties": {"statusUri": {"type": "string"}, "targetUri": {"type": "string"}},
    },
    "OmeroImportErrors": {
        "type": "object",
        "required": ["errors"],
        "properties": {"errors": {"type": "array", "items": {"type": "string"}}},
    },
}


def _document(asgi: Litestar) -> None:
    """The OpenAPI document: the import routes' bodies, and no token needed."""
    from litestar.openapi.spec import (
        OpenAPIMediaType,
        OpenAPIResponse,
        OpenAPIType,
        Reference,
        RequestBody,
        Schema,
    )

    def json_of(name: str, *, array: bool = False) -> dict[str, OpenAPIMediaType]:
        ref = Reference(ref=f"#/components/schemas/{name}")
        schema: Reference | Schema = Schema(type=OpenAPIType.ARRAY, items=ref) if array else ref
        return {"application/json": OpenAPIMediaType(schema=schema)}

    doc = asgi.openapi_schema
    doc.components.schemas.update(SCHEMAS)
    paths = doc.paths or {}
    post = paths["/ome/import"].post
    if post is not None:
        post.security = []
        post.request_body = RequestBody(
            content=json_of("OmeroImportRequest", array=True),
            required=True,
            description="the imports of one batch",
        )
        post.responses = {
            "200": OpenAPIResponse(
                "one per request, in order", content=json_of("OmeroImportQueued", array=True)
            ),
            "400": OpenAPIResponse(
                "every reason the batch is refused", content=json_of("OmeroImportErrors")
            ),
        }
    get_ = paths["/ome/import/{task_id}"].get
    if get_ is not None:
        get_.security = []


def create_web(svc: OmeroImportService, *, base_url: str | None = None) -> Litestar:
    """kew.web's app for the service's task app (monitoring API and page,
    behind the configured tokens) with the import routes added (public)."""
    from kew.web import Token, WebConfig, create_app

    tokens = [Token.parse(scope, token) for token, scope in svc.config.web.tokens.items()]
    asgi = create_app(
        svc.app,
        WebConfig(tokens=tokens, title="OMERO import"),
        routes=import_routes(svc, base_url),
    )
    asgi.on_startup.append(_document)
    base_url = base_url or svc.config.web.base_url
    if base_url:
        svc.status_url(base_url)
    return asgi
