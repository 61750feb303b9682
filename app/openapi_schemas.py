"""The OpenAPI document's components: JSON schemas, parameters and responses, as app/validation.py checks them."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import HTTP_CODES
from .validation import HTTP_SPACE, INT64, MAX_BRANCH, MAX_IDEMPOTENCY_KEY


def padding(chars: Iterable[str]) -> str:
    """A pattern of any run of these characters (built from what the checks strip, so it cannot drift)."""
    return "[" + "".join(f"\\u{ord(c):04x}" for c in chars) + "]*"


INT_PADDING = padding(HTTP_SPACE)  # what parse_int strips around a number
# What str.strip() removes (validation.providers_set strips each item so): Unicode's whitespace too.
ITEM_PADDING = padding(chr(i) for i in range(0x10000) if chr(i).isspace())


def int_text(rule: str, description: str, example: str) -> dict[str, Any]:
    """A query or header value parse_int reads: digits, an optional sign, padding; empty is the default."""
    return {"type": "string", "pattern": f"^{INT_PADDING}({rule})?{INT_PADDING}$", "description": description,
            "examples": [example]}


# The integer rules of API.md as text (a query value is text on the wire): empty is the default.
AT_LEAST_1 = int_text(r"\+?0*[1-9][0-9]*", "an integer >= 1; empty: the default; above the maximum: clamped", "20")
AT_LEAST_0 = int_text(r"\+?[0-9]+|-0+", "an integer >= 0; empty: the default", "0")
AT_LEAST_MINUS_1 = int_text(r"\+?[0-9]+|-0*1|-0+", "an integer >= -1; empty: -1 (from the beginning)", "-1")


def providers_pattern(known: Iterable[str]) -> str:
    """Comma-separated known provider types, each padded or empty (validation.providers_set)."""
    item = f"{ITEM_PADDING}({'|'.join(sorted(known))})?{ITEM_PADDING}"
    return f"^{item}(,{item})*$"


def ref(kind: str, name: str) -> dict[str, str]:
    """A $ref to a component."""
    return {"$ref": f"#/components/{kind}/{name}"}


def json_data(name: str) -> dict[str, Any]:
    """An SSE `data` field holding JSON of a component schema."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("schemas", name)}


NULLABLE_STR = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "JsonValue": {
        "description": "Any JSON value whose integers fit in 64 bits (orjson holds no larger): refused, not rounded.",
        "anyOf": [
            {"type": ["null", "boolean", "string"]},
            {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
            {"type": "number", "not": {"type": "integer"}},
            {"type": "array", "items": ref("schemas", "JsonValue")},
            {"type": "object", "additionalProperties": ref("schemas", "JsonValue")},
        ],
    },
    "Error": {
        "type": "object",
        "description": "Every error: its status code, a machine code and a human text (never a stack trace).",
        "required": ["status", "error", "message"],
        "additionalProperties": False,
        "properties": {
            "status": {"const": "error"},
            "error": {"type": "string", "pattern": "^[a-z0-9_]+$", "examples": ["bad_request"]},
            "message": {"type": "string", "minLength": 1},
        },
    },
    "Ok": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "ConversationCreate": {
        "type": "object",
        "description": "Every field optional; others are ignored. An empty string is the same as none.",
        "additionalProperties": ref("schemas", "JsonValue"),
        "properties": {
            "initial_user_msg": {**NULLABLE_STR, "description": "when not empty: event 0, a user_message"},
            "repository": {
                "type": ["string", "null"],
                "description": "owner/name; `.` and `..` are not names",
                "pattern": r"^$|^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$",
                "not": {"type": "string", "pattern": r"(^|/)\.\.?(/|$)"},
            },
            "selected_branch": {"type": ["string", "null"], "maxLength": MAX_BRANCH,
                                "pattern": "^[^\\u0000-\\u001f]*$", "description": "no control characters"},
        },
    },
    "ConversationCreated": {
        "type": "object", "required": ["status", "conversation_id"],
        "properties": {"status": {"const": "ok"}, "conversation_id": ref("schemas", "ConversationId")},
    },
    "ConversationId": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22,64}$",
                       "description": "unguessable: at least 128 random bits, URL-safe text"},
    "Conversation": {
        "type": "object",
        "required": ["conversation_id", "repository", "selected_branch", "title", "created_at", "last_event_id",
                     "agent_state"],
        "properties": {
            "conversation_id": ref("schemas", "ConversationId"),
            "repository": NULLABLE_STR,
            "selected_branch": NULLABLE_STR,
            "title": NULLABLE_STR,
            "created_at": {"type": ["string", "null"], "description": "ISO 8601, UTC"},
            "last_event_id": {"type": "integer", "minimum": -1, "description": "-1 while it has no events"},
            "agent_state": {**NULLABLE_STR, "description": "the last agent_state_changed's state; null before any run",
                            "examples": ["running", "awaiting_user_input", "stopped", "error"]},
        },
    },
    "ConversationPage": {
        "type": "object", "required": ["results", "next_page_id"],
        "properties": {
            "results": {"type": "array", "items": ref("schemas", "Conversation"), "description": "newest first"},
            "next_page_id": {"type": ["string", "null"], "pattern": "^[0-9]{1,18}$",
                             "description": "the page_id of the next page; null on the last"},
        },
    },
    "Action": {
        "type": "object",
        "description": (
            "An action: its kind in `type` (or OpenHands' `action`), 1 to 64 of a-z, 0-9, _. A `user_message` "
            "needs a non-empty string `content`, a `message` action a non-empty string `args.content`. Other "
            "fields are kept as posted; `id` and `timestamp` are the server's, `source` may only be `user`. "
            "Integers must fit in 64 bits; the whole body is at most MAX_EVENT_BYTES (default 256 KiB)."),
        "additionalProperties": ref("schemas", "JsonValue"),
        "properties": {
            "type": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$", "examples": ["user_message", "stop"]},
            "source": {"const": "user"},
        },
        "anyOf": [
            {"required": ["type"]},
            {"required": ["action"], "properties": {"action": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"}}},
        ],
        "not": {"anyOf": [{"required": ["id"]}, {"required": ["timestamp"]}]},
        "allOf": [
            {"if": {"required": ["type"], "properties": {"type": {"const": "user_message"}}},
             "then": {"required": ["content"], "properties": {"content": {"type": "string", "minLength": 1}}}},
            {"if": {"required": ["action"], "properties": {"action": {"const": "message"}}},
             "then": {"required": ["args"], "properties": {"args": {
                 "type": "object", "required": ["content"],
                 "properties": {"content": {"type": "string", "minLength": 1}}}}}},
        ],
        "examples": [{"type": "user_message", "content": "hello"}, {"action": "message", "args": {"content": "hi"}}],
    },
    "EventPosted": {
        "type": "object", "required": ["status", "success", "event_id"],
        "properties": {"status": {"const": "ok"}, "success": {"const": True},
                       "event_id": {"type": "integer", "minimum": 0}},
    },
    "Event": {
        "type": "object",
        "description": "An event as stored: the server's id, timestamp and source, then the posted fields as posted.",
        "required": ["id", "timestamp", "source"],
        "properties": {
            "id": {"type": "integer", "minimum": 0, "description": "from 0, consecutive, per conversation"},
            "timestamp": {"type": "string", "examples": ["2026-11-30T12:00:00.123456+00:00"]},
            "source": {"enum": ["user", "agent", "environment"]},
            "type": {"type": "string"},
            "cause": {"type": "integer", "description": "an agent's event: the id of the user event it answers"},
        },
    },
    "EventPage": {
        "type": "object", "required": ["events", "has_more"],
        "properties": {"events": {"type": "array", "items": ref("schemas", "Event")}, "has_more": {"type": "boolean"}},
    },
    "Session": {
        "type": "object", "required": ["status", "user_id"],
        "properties": {"status": {"const": "ok"}, "user_id": {"type": "string", "minLength": 1}},
    },
    "Health": {
        "type": "object", "required": ["status", "worker_pid", "streams", "conversations", "channels"],
        "properties": {"status": {"const": "ok"}, "worker_pid": {"type": "integer"},
                       "streams": {"type": "integer", "minimum": 0}, "conversations": {"type": "integer", "minimum": 0},
                       "channels": {"type": "integer", "minimum": 0}},
    },
    "Ready": {
        "type": "object", "required": ["status", "worker_pid"],
        "properties": {"status": {"const": "ok"}, "worker_pid": {"type": "integer"}},
    },
    "ServerSentEvent": {
        "description": (
            "One block of the stream (the `retry:` line and `: ping` comments aside): a named `connection` event "
            "first, then each stored event as `id:` + `data:` (unnamed: `message`), and in band the named "
            "`history_truncated` and `agent_message_delta` (no `id:`, not stored)."),
        "oneOf": [
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": "connection"}, "retry": {"type": "integer", "minimum": 0},
                            "data": json_data("ConnectionEstablished")}},
            {"type": "object", "required": ["event", "data", "id"],
             "properties": {"event": {"const": "message"}, "id": {"type": "string", "pattern": "^[0-9]+$"},
                            "data": json_data("Event")}},
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": "history_truncated"}, "data": json_data("HistoryTruncated")}},
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": "agent_message_delta"}, "data": json_data("AgentMessageDelta")}},
        ],
    },
    "ConnectionEstablished": {
        "type": "object",
        "required": ["type", "connection_id", "conversation_id", "latest_event_id", "providers_set", "agent_state"],
        "properties": {
            "type": {"const": "connection_established"},
            "connection_id": {"type": "string", "minLength": 1},
            "conversation_id": ref("schemas", "ConversationId"),
            "latest_event_id": {"type": "integer", "minimum": -1, "description": "the id the stream resumes after"},
            "providers_set": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "agent_state": NULLABLE_STR,
        },
    },
    "HistoryTruncated": {
        "type": "object", "required": ["earliest_event_id"],
        "properties": {"earliest_event_id": {"type": "integer", "minimum": 0}},
    },
    "AgentMessageDelta": {
        "type": "object", "required": ["cause", "offset", "text"],
        "properties": {"cause": {"type": "integer", "minimum": 0}, "offset": {"type": "integer", "minimum": 0},
                       "text": {"type": "string"}},
    },
}

RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True,
               "schema": {"type": "integer", "minimum": 0}}
ERROR_TEXT = {
    400: "Malformed input (a parameter, header or body outside the rules above, a body cut short or badly framed).",
    401: "No credentials, or bad ones (unknown, revoked, a forged or expired cookie).",
    403: "A session cookie used for a write from another origin (`Sec-Fetch-Site`/`Origin`): send the key.",
    404: "Unknown, or another user's: the same answer either way.",
    405: "A method the path does not have; `Allow` lists those it has.",
    408: "The body did not arrive whole within REQUEST_BODY_TIMEOUT_SECONDS (default 30) of the request's head.",
    409: "This Idempotency-Key was used for another body in this conversation.",
    413: "The body is larger than MAX_EVENT_BYTES (default 262144 bytes).",
    415: "A body that is not JSON (`Content-Type` not application/json or */*+json).",
    429: "Too many: a per-key rate limit (POST_RATE_LIMIT, STREAM_RATE_LIMIT a minute), or the per-user cap of "
         "open streams.",
    503: "Redis unreachable or not taking writes now (or this worker is not ready): retry after `Retry-After`.",
}
HTTP_CODES_MORE = {403: "forbidden", 408: "request_timeout", 409: "conflict", 503: "service_unavailable"}


def error_response(status: int) -> dict[str, Any]:
    """The JSON error answer of a status, with the header it always carries."""
    code = HTTP_CODES.get(status) or HTTP_CODES_MORE[status]
    answer: dict[str, Any] = {
        "description": ERROR_TEXT[status],
        "content": {"application/json": {"schema": ref("schemas", "Error"),
                                          "example": {"status": "error", "error": code, "message": "..."}}},
    }
    if status in (429, 503):
        answer["headers"] = {"Retry-After": RETRY_AFTER}
    if status == 405:
        answer["headers"] = {"Allow": {"description": "the methods the path has", "required": True,
                                       "schema": {"type": "string"}}}
    return answer


RESPONSES = {f"E{status}": error_response(status) for status in ERROR_TEXT}

PARAMETERS: dict[str, Any] = {
    "cid": {"name": "cid", "in": "path", "required": True, "description": (
        "A conversation id (as `POST /api/conversations` gave). Any other text, or another user's id, is a 404."),
        "schema": {"type": "string", "minLength": 1}},
    "IdempotencyKey": {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": ("1 to 255 printable ASCII characters. A retry with the same key (per conversation, kept "
                        "IDEMPOTENCY_TTL_SECONDS, default 24 h) gets the same answer and adds no second event; "
                        "the same key with another body is a 409."),
        # HTTP drops a value's leading and trailing spaces, so a key neither starts nor ends with one.
        "schema": {"type": "string", "pattern": f"^[\\u0021-\\u007e]([\\u0020-\\u007e]{{0,{MAX_IDEMPOTENCY_KEY - 2}}}"
                                                "[\\u0021-\\u007e])?$"},
    },
}
