"""The OpenAPI 3.1 document of the whole HTTP API (API.md), built from the app's settings and checks."""
from __future__ import annotations

from typing import Any

from flask import Flask

from .api.conversations import PAGE_DEFAULT, PAGE_MAX
from .api.events import LIST_DEFAULT, LIST_MAX
from .auth import COOKIE_NAME
from .openapi_schemas import (
    AT_LEAST_0,
    AT_LEAST_1,
    AT_LEAST_MINUS_1,
    PARAMETERS,
    RESPONSES,
    SCHEMAS,
    providers_pattern,
    ref,
)

# Every JSON error on every route has one of these statuses; a route lists those it can give.
BASIC = (401, 503)  # any authenticated route: its key is looked up in Redis
PUBLIC: list[dict[str, list[str]]] = []  # no credentials needed (an operation's `security`)

INFO_DESCRIPTION = """\
The REST + Server-Sent Events API of the OpenHands conversation service (the contract is API.md).

**Auth.** Every `/api/...` route but this document, `/api/docs` and `DELETE /api/session` needs a caller:
`Authorization: Bearer <api key>` (made with `flask --app wsgi keys create USER_ID`), or the session cookie
`oh_session` that every `2xx` answer to a Bearer request sets (`HttpOnly`, `SameSite=Lax`, `Path=/`, `Secure`
over https): an `EventSource` cannot send headers, so the cookie authenticates it. A Bearer key, when sent,
is the only credential looked at. A cookie-authenticated write from another origin is a `403`.

**Errors.** Every error is JSON `{"status": "error", "error": "<machine code>", "message": "<text>"}`; no
route answers a client's mistake with `500`. An unknown path is a JSON `404`, a method a path does not have
a `405` with `Allow`. `429` and `503` carry `Retry-After`.

**Every answer** carries `X-Request-ID` (the client's own when it sent a valid one) and the security headers
(a strict `Content-Security-Policy`, `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
`X-Frame-Options: DENY`).
"""


def responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    """An operation's responses: its 200 and the JSON errors it can give."""
    answers: dict[str, Any] = {"200": ok}
    answers.update({str(status): ref("responses", f"E{status}") for status in sorted(set(errors))})
    return answers


def json_ok(schema: str, description: str, **extra: Any) -> dict[str, Any]:
    """A 200 with a JSON body of a component schema."""
    return {"description": description, "content": {"application/json": {"schema": ref("schemas", schema)}},
            **extra}


def operation(op_id: str, tag: str, summary: str, answers: dict[str, Any], *, description: str = "",
              parameters: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
              security: list[dict[str, list[str]]] | None = None) -> dict[str, Any]:
    """One operation object."""
    op: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary, "responses": answers}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    if security is not None:
        op["security"] = security
    return op


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """An optional query parameter."""
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def json_body(schema: str, *, required: bool, examples: dict[str, Any]) -> dict[str, Any]:
    """A JSON request body of a component schema, with examples of it."""
    return {"required": required, "content": {"application/json": {
        "schema": ref("schemas", schema), "examples": {name: {"value": value} for name, value in examples.items()}}}}


# What a client does with a conversation it created: the document's links (schemathesis follows them).
CONVERSATION_LINKS = {
    op_id: {"operationId": op_id, "parameters": {"cid": "$response.body#/conversation_id"}}
    for op_id in ("getConversation", "postEvent", "listEvents", "streamEvents", "probeStream", "deleteConversation")
}


def conversation_paths() -> dict[str, Any]:
    """/api/conversations and a conversation."""
    cid = ref("parameters", "cid")
    return {
        "/api/conversations": {
            "post": operation(
                "createConversation", "Conversations", "Create a conversation",
                responses(json_ok("ConversationCreated", "Created; its initial message, if any, is event 0.",
                                  links=CONVERSATION_LINKS), 400, 401, 403, 408, 413, 415, 429, 503),
                description="The body is optional (empty, or a JSON object). A conversation belongs to its creator.",
                body=json_body("ConversationCreate", required=False, examples={
                    "message": {"initial_user_msg": "Check the README"},
                    "repository": {"initial_user_msg": "Check it", "repository": "octo/hello",
                                   "selected_branch": "main"},
                    "empty": {}})),
            "get": operation(
                "listConversations", "Conversations", "The caller's conversations, newest first",
                responses(json_ok("ConversationPage", "A page of conversations."), 400, *BASIC),
                parameters=[
                    query("limit", AT_LEAST_1, f"page size: default {PAGE_DEFAULT}, at most {PAGE_MAX} (clamped)"),
                    query("page_id", {"type": "string", "pattern": "^[0-9]{0,18}$"},
                          "the `next_page_id` of the page before; empty or absent: the first page"),
                ]),
        },
        "/api/conversations/{cid}": {
            "parameters": [cid],
            "get": operation("getConversation", "Conversations", "One conversation",
                             responses(json_ok("Conversation", "The conversation."), 404, *BASIC)),
            "delete": operation(
                "deleteConversation", "Conversations", "Delete a conversation",
                responses(json_ok("Ok", "Deleted with its events; its open streams end within 2 s."),
                          403, 404, *BASIC),
                description="Later calls on it get 404."),
        },
        "/api/conversations/{cid}/events": {
            "parameters": [cid],
            "post": operation(
                "postEvent", "Events", "Post an action",
                responses(json_ok("EventPosted", "Stored as a `user` event with the next id (or, for an "
                                                 "Idempotency-Key retry, the answer the first one got)."),
                          400, 403, 404, 408, 409, 413, 415, 429, *BASIC),
                description=("A `user_message` (or a `message` action) starts an agent run that answers it; "
                             "`{\"type\": \"stop\"}` ends the run going."),
                parameters=[ref("parameters", "IdempotencyKey")], body=json_body("Action", required=True, examples={
                    "user_message": {"type": "user_message", "content": "hello"},
                    "openhands_message": {"action": "message", "args": {"content": "hi"}},
                    "stop": {"type": "stop"},
                    "other": {"type": "note", "text": "kept as posted", "n": 3}})),
            "get": operation(
                "listEvents", "Events", "Stored events from start_id on",
                responses(json_ok("EventPage", "Events in id order; `has_more` when more follow."), 400, 404,
                          *BASIC),
                parameters=[
                    query("start_id", AT_LEAST_0, "the first event id wanted; default 0"),
                    query("limit", AT_LEAST_1, f"events at most: default {LIST_DEFAULT}, at most {LIST_MAX} (clamped)"),
                ]),
        },
    }


STREAM_HEADERS = {
    "Cache-Control": {"required": True, "schema": {"const": "no-cache"}},
    "X-Accel-Buffering": {"required": True, "schema": {"const": "no"}, "description": "nginx passes each event on"},
}


def stream_path(providers: list[str]) -> dict[str, Any]:
    """The live stream of a conversation, GET and HEAD."""
    params = [
        ref("parameters", "cid"),
        query("latest_event_id", AT_LEAST_MINUS_1, "the last event id the client has; the stream sends every "
                                                   "later one. Default -1: from the beginning"),
        query("providers_set", {"type": "string", "pattern": providers_pattern(providers)},
              f"comma-separated provider types, each one of: {', '.join(providers)} (the PROVIDERS setting); "
              "empty items are ignored, order and repeats do not matter"),
        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": AT_LEAST_MINUS_1,
         "description": "sent by a reconnecting EventSource; wins over latest_event_id (when not empty)"},
    ]
    stream = {
        "description": (
            "The stream: a `retry: <ms>` line and the named `connection` event, every stored event after "
            "the resume point as `id: <id>` + `data: <event JSON>`, then each new one as it is written. "
            "`: ping` comment lines keep it open while idle (SSE_HEARTBEAT_SECONDS). It ends within 2 s when "
            "the conversation is deleted or the key revoked, and never serves another request on its "
            "connection. `history_truncated` says in band that retention dropped what followed the resume "
            "point; `agent_message_delta` events carry a reply as it is written."),
        "headers": STREAM_HEADERS,
        # OpenAPI 3.1 has no itemSchema: for text/event-stream, `schema` is read as that of each event.
        "content": {"text/event-stream": {"schema": ref("schemas", "ServerSentEvent")}},
    }
    head = {"description": "The headers a GET would get, and no stream: lets a client learn what opening it "
                           "would answer (the browser client asks before each EventSource).",
            "headers": STREAM_HEADERS}
    return {
        "/api/sse/conversations/{cid}/events": {
            "parameters": params,
            "get": operation("streamEvents", "Events", "Follow a conversation live (Server-Sent Events)",
                             responses(stream, 400, 404, 429, *BASIC),
                             description="A 401 comes before a 400. Open streams per user are capped "
                                         "(SSE_MAX_STREAMS_PER_USER, default 100): one more is a 429."),
            "head": operation("probeStream", "Events", "What opening the stream would answer",
                              responses(head, 400, 404, *BASIC)),  # a HEAD opens nothing: no limit
        },
    }


def session_and_ops_paths() -> dict[str, Any]:
    """The session (the web app's sign-in), the probes, /metrics, the page, its files and these docs."""
    session = json_ok("Session", "The caller's user id.")
    text = {"description": "", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "/api/session": {
            "get": operation("whoAmI", "Session", "Who the credentials prove", responses(session, *BASIC)),
            "post": operation(
                "signIn", "Session", "Sign in: a Bearer key in, the session cookie out",
                responses({**session, "headers": {"Set-Cookie": {
                    "description": f"`{COOKIE_NAME}=...; HttpOnly; Path=/; SameSite=Lax` (and `Secure` over https)",
                    "schema": {"type": "string"}}}}, 400, 403, *BASIC),
                description="A 400 when the caller came with a cookie only: signing in takes the key itself."),
            "delete": operation(
                "signOut", "Session", "Sign out",
                responses(json_ok("Ok", "The cookie is cleared, and every cookie the key minted so far is "
                                        "revoked; the key itself stays valid."), 403, 503),
                description="Needs no valid credentials: a stale cookie must be clearable.",
                security=[{}, {"bearerAuth": []}, {"cookieAuth": []}]),
        },
        "/healthz": {"get": operation(
            "healthz", "Operations", "Liveness",
            responses(json_ok("Health", "This worker's hub loops run (Redis is not asked)."), 503),
            description="503 `hub_not_running` only when a hub loop of this worker has died.", security=PUBLIC)},
        "/readyz": {"get": operation(
            "readyz", "Operations", "Readiness",
            responses(json_ok("Ready", "Redis answers and this worker's hub receives announcements."), 503),
            description="503 `shutting_down`, `redis_unavailable` (or Redis's own code), or `hub_not_reading`.",
            security=PUBLIC)},
        "/metrics": {"get": operation(
            "metrics", "Operations", "Prometheus metrics of every worker",
            responses({"description": "The Prometheus text format.",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}, 404),
            description="For loopback callers, or with `Authorization: Bearer <METRICS_TOKEN>`; a 404 to others.",
            security=[{}, {"metricsToken": []}])},
        "/": {"get": operation("webApp", "Web", "The web app (one page)",
                               responses({**text, "description": "The page; its scripts do the rest."}),
                               security=PUBLIC)},
        "/static/{filename}": {"get": operation(
            "staticFile", "Web", "The web app's scripts, styles and the browser client",
            responses({"description": "The file.", "content": {"*/*": {}}}, 404),
            parameters=[{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"},
                         "description": "e.g. `openhands-client.js`", "example": "openhands-client.js"}],
            security=PUBLIC)},
        "/api/openapi.json": {"get": operation(
            "openapi", "Docs", "This document",
            responses({"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["openapi", "paths"]}}}}), security=PUBLIC)},
        "/api/docs": {"get": operation("docs", "Docs", "This document as a page",
                                       responses({**text, "description": "Every operation, readable."}),
                                       security=PUBLIC)},
    }


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of this app (its PROVIDERS setting is in it)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "OpenHands conversations: REST + Server-Sent Events", "version": "1",
                 "description": INFO_DESCRIPTION},
        "tags": [{"name": name} for name in ("Conversations", "Events", "Session", "Operations", "Web", "Docs")],
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "paths": {**conversation_paths(), **stream_path(list(app.config["PROVIDERS"])), **session_and_ops_paths()},
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "an API key, `ohk_<id>_<secret>`"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": COOKIE_NAME,
                               "description": "the session cookie a 2xx answer to a Bearer request sets"},
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN (/metrics only)"},
            },
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": RESPONSES,
        },
    }
