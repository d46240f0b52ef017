"""The OpenAPI document as a plain HTML page, rendered on the server:
every operation (method, path, summary, parameters, request body,
responses) and every schema (fields, types, what is required).

No script and no asset from elsewhere, so it works offline and behind a
proxy.  Served as the page's ``/ui/api`` (with the page's login) and as
Litestar's documentation site at ``/schema`` (also ``/schema/docs`` and
``/schema/swagger``, for old links; bearer token or page session); the
document itself stays at ``/schema/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import OpenAPIRenderPlugin
from markupsafe import Markup, escape

from kew.web._render import PAGE, render, render_text

_METHODS = ("get", "post", "put", "patch", "delete", "head")


def type_html(schema: Any) -> Markup:
    """A JSON schema as a short type for people (references are links)."""
    if not isinstance(schema, dict):
        return Markup("any")
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        return Markup('<a href="#schema-{0}">{0}</a>').format(name)
    for key in ("oneOf", "anyOf"):
        if isinstance(schema.get(key), list):
            return Markup(" | ").join(type_html(s) for s in schema[key])
    if "const" in schema:
        return Markup("<code>{}</code>").format(repr(schema["const"]))
    if isinstance(schema.get("enum"), list):
        return Markup(" | ").join(Markup("<code>{}</code>").format(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return Markup(" | ").join(type_html({**schema, "type": k}) for k in kind)
    if kind == "array":
        return Markup("array of ") + type_html(schema.get("items"))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return Markup("object of ") + type_html(schema["additionalProperties"])
    if isinstance(kind, str):
        fmt = schema.get("format")
        limits = [
            f"{word} {schema[k]}"
            for k, word in (
                ("minimum", "&ge;"),
                ("maximum", "&le;"),
                ("minLength", "length &ge;"),
                ("maxLength", "length &le;"),
            )
            if k in schema
        ]
        extra = ", ".join([*([str(escape(fmt))] if fmt else []), *limits])
        return escape(kind) + (Markup(f" <span class='muted'>({extra})</span>") if extra else "")
    return Markup("any")


def _operation(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    body = op.get("requestBody") or {}
    body_types = [(mt, type_html(c.get("schema"))) for mt, c in (body.get("content") or {}).items()]
    responses = []
    for code, r in sorted((op.get("responses") or {}).items()):
        content = r.get("content") or {}
        types = [(mt, type_html(c.get("schema"))) for mt, c in content.items()]
        responses.append({"code": code, "description": r.get("description", ""), "types": types})
    params = [
        {
            "name": p.get("name", ""),
            "where": p.get("in", ""),
            "required": bool(p.get("required")),
            "type": type_html(p.get("schema")),
            "description": p.get("description", ""),
        }
        for p in op.get("parameters") or []
    ]
    return {
        "anchor": f"{method}-{path}".replace("/", "_").replace("{", "").replace("}", ""),
        "method": method.upper(),
        "path": path,
        "summary": op.get("summary", ""),
        "description": op.get("description", ""),
        "auth": bool(op.get("security")),
        "params": params,
        "body": {
            "required": bool(body.get("required")),
            "types": body_types,
            "description": body.get("description", ""),
        }
        if body
        else None,
        "responses": responses,
    }


def _schema(name: str, s: dict[str, Any]) -> dict[str, Any]:
    required = set(s.get("required") or ())
    props = [
        {
            "name": prop,
            "type": type_html(ps),
            "required": prop in required,
            "description": ps.get("description", "") if isinstance(ps, dict) else "",
        }
        for prop, ps in (s.get("properties") or {}).items()
    ]
    return {
        "name": name,
        "description": s.get("description", ""),
        "props": props,
        "type": None if props else type_html(s),
    }


def api_context(doc: dict[str, Any]) -> dict[str, Any]:
    """What ``api.html`` shows of an OpenAPI document."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, item in (doc.get("paths") or {}).items():
        for method in _METHODS:
            op = item.get(method)
            if isinstance(op, dict):
                tag = (op.get("tags") or ["other"])[0]
                groups.setdefault(tag, []).append(_operation(path, method, op))
    info = doc.get("info") or {}
    schemas = (doc.get("components") or {}).get("schemas") or {}
    return {
        "api_title": info.get("title", "API"),
        "api_version": info.get("version", ""),
        "servers": [s.get("url", "") for s in doc.get("servers") or []],
        "groups": sorted(groups.items()),
        "schemas": [_schema(n, s) for n, s in sorted(schemas.items()) if isinstance(s, dict)],
    }


class HtmlDocs(OpenAPIRenderPlugin):
    """Litestar's documentation site for the document: :func:`api_context`
    rendered on the server (instead of Swagger UI from a CDN)."""

    def __init__(self) -> None:
        super().__init__(path=["/", "/docs", "/swagger"])

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        html = render_text(request, "api.html", heading="API", **api_context(openapi_schema))
        return html.encode()


@get("/ui/api", include_in_schema=False, opt=PAGE)
async def api_page(request: Request[Any, Any, Any]) -> Response[str]:
    """The API reference page, from the served OpenAPI document."""
    doc = request.app.openapi_schema.to_schema()
    return render(request, "api.html", heading="API", **api_context(doc))


#: The page's API reference route.
APIDOC_ROUTES: list[HTTPRouteHandler] = [api_page]
