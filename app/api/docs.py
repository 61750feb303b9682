"""GET /api/openapi.json (the OpenAPI document) and GET /api/docs (the same as a page), both without auth."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, render_template

from ..auth import self_authenticating
from ..openapi import document

bp = Blueprint("docs", __name__)
METHODS = ("get", "head", "post", "put", "patch", "delete")


def cached_document() -> dict[str, Any]:
    """The document of the current app, built on first use (it depends on settings only)."""
    doc = current_app.extensions.get("openapi")
    if doc is None:
        doc = current_app.extensions["openapi"] = document(current_app)
    return doc


@bp.get("/api/openapi.json")
@self_authenticating  # needs no caller: the document holds no secret, and clients read it before they have a key
def openapi_json() -> Response:
    """The OpenAPI 3.1 document."""
    response = Response(orjson.dumps(cached_document()), mimetype="application/json")
    response.headers["Cache-Control"] = "no-cache"
    return response


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """A `$ref` to a component followed (once, as deep as it goes), anything else as it is."""
    while isinstance(node, dict) and "$ref" in node:
        _hash, *path = node["$ref"].split("/")
        target: Any = doc
        for part in path:
            target = target[part]
        node = target
    return node


def pretty(value: Any) -> str:
    """JSON, indented, for a <pre>."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def schema_view(schema: Any) -> dict[str, str]:
    """A schema for the page: the name of the component it refers to (a link), else its JSON."""
    if isinstance(schema, dict) and set(schema) == {"$ref"} and schema["$ref"].startswith("#/components/schemas/"):
        return {"ref": schema["$ref"].rsplit("/", 1)[1]}
    return {"json": pretty(schema)}


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation with its parameters and responses resolved, in document order."""
    found = []
    for path, item in doc["paths"].items():
        shared = item.get("parameters", [])
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            params = [resolve(doc, p) for p in [*shared, *op.get("parameters", [])]]
            answers = []
            for status, answer in op["responses"].items():
                answer = resolve(doc, answer)
                answers.append({"status": status, "description": answer.get("description", ""),
                                "content": {media: schema_view(body["schema"]) if "schema" in body else {}
                                            for media, body in answer.get("content", {}).items()},
                                "headers": answer.get("headers", {})})
            body = op.get("requestBody")
            security = op.get("security", doc["security"])
            found.append({
                "method": method.upper(), "path": path, "id": op["operationId"], "tag": op["tags"][0],
                "summary": op["summary"], "description": op.get("description", ""),
                "security": [", ".join(s) or "none" for s in security] or ["none"],
                "parameters": [{**p, "schema": pretty(p["schema"])} for p in params],
                "body": {"required": body.get("required", False),
                         "content": {media: schema_view(b["schema"]) for media, b in body["content"].items()},
                         "examples": [pretty(e["value"]) for b in body["content"].values()
                                      for e in b.get("examples", {}).values()]}
                if body else None,
                "responses": answers,
            })
    return found


@bp.get("/api/docs")
@self_authenticating
def docs_page() -> Response:
    """The document as a page: every operation, its parameters, body and answers, then the schemas."""
    # Rendered once per worker, like the document it shows: it depends on settings only, and a
    # page anyone may fetch must not cost a template render (4 ms of CPU) each time.
    html = current_app.extensions.get("openapi_page")
    if html is None:
        doc = cached_document()
        schemas = {name: pretty(schema) for name, schema in doc["components"]["schemas"].items()}
        html = current_app.extensions["openapi_page"] = render_template(
            "api_docs.html", info=doc["info"], operations=operations(doc), schemas=schemas,
            tags=[t["name"] for t in doc["tags"]],
            schemes=doc["components"]["securitySchemes"], version=doc["openapi"])
    response = Response(html, mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response
