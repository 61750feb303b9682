"""The OpenAPI document (/api/openapi.json) and its page (/api/docs): true to the registered routes and the checks."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import jsonschema_rs
import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.definitions import OPENAPI_31

from app import create_app, validation
from app.errors import BadRequest
from app.openapi import document
from app.openapi_schemas import AT_LEAST_0, AT_LEAST_1, AT_LEAST_MINUS_1, PARAMETERS, providers_pattern

from .conftest import assert_error, bearer

HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


def routable(app: Flask) -> set[tuple[str, str]]:
    """Every (method, OpenAPI path) the app answers, the HEAD Flask adds to each GET included (OPTIONS aside)."""
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # <cid>, <path:filename> -> {cid}, {filename}
        found.update((method, path) for method in set(rule.methods or ()) - {"OPTIONS"})
    return found


def documented(doc: dict) -> set[tuple[str, str]]:
    """Every (method, path) of the document."""
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in HTTP_METHODS if method in item}


def undocumented(app: Flask) -> set[tuple[str, str]]:
    """Routes the document misses; a HEAD Flask answers for a GET is documented only where it means more."""
    return {(m, p) for m, p in routable(app) if m != "HEAD"} - documented(document(app))


def test_every_registered_route_is_documented_and_every_documented_one_exists(app):
    doc = document(app)
    assert undocumented(app) == set()
    assert documented(doc) - routable(app) == set(), "documented operations the app has no route for"
    # The paths a client uses are all there.
    for path in ("/api/conversations", "/api/conversations/{cid}", "/api/conversations/{cid}/events",
                 "/api/sse/conversations/{cid}/events", "/api/session", "/healthz", "/readyz", "/metrics", "/",
                 "/api/openapi.json", "/api/docs"):
        assert path in doc["paths"], path
    assert ("HEAD", "/api/sse/conversations/{cid}/events") in documented(doc)


def test_a_route_added_without_documenting_it_fails_the_comparison(app):
    @app.post("/api/conversations/<cid>/archive")
    def archive(cid: str) -> str:
        return cid

    @app.put("/api/session")
    def replace_session() -> str:
        return ""

    assert undocumented(app) == {("POST", "/api/conversations/{cid}/archive"), ("PUT", "/api/session")}


def test_the_document_is_valid_openapi_3_1_and_every_operation_is_complete(app):
    doc = document(app)
    jsonschema_rs.validator_for(OPENAPI_31).validate(doc)
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in HTTP_METHODS]
    assert len(ids) == len(set(ids)) == len(documented(doc))
    for path, item in doc["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            op = item[method]
            public = op.get("security") is not None and {} in op["security"] or op.get("security") == []
            statuses = set(op["responses"])
            assert "200" in statuses, (method, path)
            # An operation that needs a caller says so, and may answer 401 (and 503: the key is in Redis).
            assert public or {"401", "503"} <= statuses, (method, path, statuses)
            if op.get("requestBody"):
                assert {"400", "408", "413", "415"} <= statuses, (method, path)
            if "{cid}" in path:
                assert "404" in statuses, (method, path)
            for status in statuses & {"429", "503"}:
                answer = doc["components"]["responses"][f"E{status}"]
                assert answer["headers"]["Retry-After"]["required"] is True


def test_posting_and_opening_streams_document_429_with_retry_after(app):
    paths = document(app)["paths"]
    for method, path in (("post", "/api/conversations/{cid}/events"), ("post", "/api/conversations"),
                         ("get", "/api/sse/conversations/{cid}/events")):
        assert paths[path][method]["responses"]["429"] == {"$ref": "#/components/responses/E429"}


def test_openapi_json_and_docs_need_no_credentials_and_carry_the_security_headers(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json()["openapi"] == "3.1.0"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "Set-Cookie" not in response.headers
    page = client.get("/api/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == response.headers["Content-Security-Policy"]
    # The rest of /api still needs a caller; a path it does not have is a JSON 404.
    assert_error(client.get("/api/conversations"), 401, "unauthorized")
    assert_error(client.get("/api/openapi.yaml"), 404, "not_found")


def test_the_document_follows_the_providers_setting(redis_server, redis_client):
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "PROVIDERS": ("forgejo",)})
    param = next(p for p in document(app)["paths"]["/api/sse/conversations/{cid}/events"]["parameters"]
                 if p.get("name") == "providers_set")
    assert "forgejo" in param["schema"]["pattern"] and "github" not in param["schema"]["pattern"]


class Page(HTMLParser):
    """What /api/docs holds: its operations, scripts, inline styles and stylesheets."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[str] = []
        self.scripts = 0
        self.inline_styles = 0
        self.stylesheets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Note each tag that matters here."""
        values = dict(attrs)
        if "data-operation" in values:
            self.operations.append(values["data-operation"] or "")
        if tag in ("script", "style") or any(name.startswith("on") for name in values):
            self.scripts += 1
        if "style" in values:
            self.inline_styles += 1
        if tag == "link" and values.get("rel") == "stylesheet":
            self.stylesheets.append(values.get("href") or "")


def test_the_docs_page_shows_every_operation_with_no_script_and_its_own_stylesheet(app, client):
    page = Page()
    body = client.get("/api/docs").get_data(as_text=True)
    page.feed(body)
    doc = document(app)
    assert sorted(page.operations) == sorted(f"{m} {p}" for m, p in documented(doc))
    assert page.scripts == 0 and page.inline_styles == 0  # the CSP allows neither inline
    assert page.stylesheets == ["/static/api-docs.css"]
    css = client.get(page.stylesheets[0])
    assert css.status_code == 200 and css.mimetype == "text/css"
    css.close()
    for op in (o for item in doc["paths"].values() for m, o in item.items() if m in HTTP_METHODS):
        assert f'id="op-{op["operationId"]}"' in body and op["summary"] in body.replace("&#39;", "'")
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in body
    assert "Idempotency-Key" in body and "Last-Event-ID" in body and "Retry-After" in body


def accepts(minimum: int, text: str) -> bool:
    """Whether validation.parse_int takes `text` with this minimum."""
    try:
        validation.parse_int("n", text, default=0, minimum=minimum)
    except BadRequest:
        return False
    return True


def matches(schema: dict, text: str) -> bool:
    """Whether `text` matches a string schema's pattern as JSON Schema means it (anchored, no trailing newline)."""
    pattern = schema["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$")
    return re.fullmatch(pattern[1:-1], text) is not None


NUMBERISH = st.text(alphabet="0123456789+-  \t\u3000\u2028\x1cx\n", max_size=8)


@settings(max_examples=400, deadline=None, database=None)
@given(NUMBERISH)
def test_the_integer_patterns_take_exactly_what_parse_int_takes(text):
    for schema, minimum in ((AT_LEAST_1, 1), (AT_LEAST_0, 0), (AT_LEAST_MINUS_1, -1)):
        assert matches(schema, text) == accepts(minimum, text), (schema["description"], text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(["github", "gitlab", "bitbucket", "GitHub", "svn", "", " ", "\u3000", "\t"]),
                max_size=4).map(",".join))
def test_the_providers_pattern_takes_exactly_what_providers_set_takes(text):
    known = ("github", "gitlab", "bitbucket")
    try:
        validation.providers_set(text, known)
        taken = True
    except BadRequest:
        taken = False
    assert (re.fullmatch(providers_pattern(known)[1:-1], text) is not None) == taken


@pytest.mark.parametrize("value", ["k", "a b", "x" * 255, "~!@#$%^&*()"])
def test_an_idempotency_key_the_pattern_takes_is_taken(value):
    assert matches(PARAMETERS["IdempotencyKey"]["schema"], value)
    assert validation.idempotency_key(value)


@pytest.mark.parametrize("value", ["x" * 256, "é", "a\x7f"])
def test_an_idempotency_key_the_pattern_refuses_is_refused(value):
    assert not matches(PARAMETERS["IdempotencyKey"]["schema"], value)
    with pytest.raises(BadRequest):
        validation.idempotency_key(value)


def test_the_documented_error_answers_are_what_the_api_sends(client, key):
    answer = client.post("/api/conversations", data="x", content_type="text/plain", headers=bearer(key))
    body = assert_error(answer, 415)
    error_schema = document(client.application)["components"]["schemas"]["Error"]
    jsonschema_rs.validator_for(error_schema).validate(body)
