"""Checks of client input (query parameters, bodies, headers): pure functions, unit-tested."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import orjson

from .errors import BadRequest

ACTION_TYPE = re.compile(r"[a-z0-9_]{1,64}")
REPOSITORY = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
USER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
SERVER_FIELDS = ("id", "timestamp", "source")
MAX_BRANCH = 255
MAX_IDEMPOTENCY_KEY = 255
# Python converts at most 4300 digits (a guard against quadratic work); no bound of ours is near.
MAX_DIGITS = 4000
# HTTP's own whitespace (OWS: space and tab) may surround a value. str.strip() would also take
# Unicode's (U+3000, U+2028, the \x1c-\x1f separators), which no client means as padding.
HTTP_SPACE = " \t"


def parse_int(name: str, raw: str | None, *, default: int, minimum: int, maximum: int | None = None) -> int:
    """An integer of any length: empty is the default; not one, or below `minimum`, a 400; clamped to `maximum`."""
    if raw is None or raw.strip(HTTP_SPACE) == "":
        return default
    text = raw.strip(HTTP_SPACE)
    # [0-9], not \d: \d also matches other scripts' digits, which no client means as a number.
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise BadRequest(f"{name} must be an integer, got {raw[:40]!r}")
    negative = text.startswith("-")
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > MAX_DIGITS:
        if negative:
            raise BadRequest(f"{name} must be >= {minimum}, got {text[:20]}…")
        if maximum is not None:
            return maximum
        raise BadRequest(f"{name} has more than {MAX_DIGITS} digits")
    value = -int(digits) if negative else int(digits)  # zeros stripped: int() takes at most 4300 digits
    if value < minimum:
        raise BadRequest(f"{name} must be >= {minimum}, got {str(value)[:40]}")
    return min(value, maximum) if maximum is not None else value


def resume_point(header: str | None, query: str | None) -> int:
    """The event id a stream resumes after: Last-Event-ID (if sent) wins over latest_event_id."""
    if header is not None and header.strip(HTTP_SPACE) != "":
        return parse_int("Last-Event-ID", header, default=-1, minimum=-1)
    return parse_int("latest_event_id", query, default=-1, minimum=-1)


def providers_set(raw: str | None, known: Iterable[str]) -> list[str]:
    """The providers named in `providers_set` (sorted, no repeats); an unknown one is a 400."""
    names = {p.strip() for p in (raw or "").split(",") if p.strip()}
    unknown = sorted(names - set(known))
    if unknown:
        raise BadRequest(f"unknown provider type {unknown[0][:40]!r}; known: {', '.join(sorted(known))}")
    return sorted(names)


INT64 = (-(2**63), 2**64 - 1)


def _json_int(text: str) -> int:
    value = int(text)
    if not INT64[0] <= value <= INT64[1]:
        # orjson, which encodes stored events, holds 64-bit integers; refusing beats rounding.
        raise ValueError("integers must fit in 64 bits")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _json_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; anything else (bad JSON, too deep, not an object) is a 400.

    Every number is kept exactly as posted or refused: no integer is rounded to a float.
    """
    if not body.strip():
        raise BadRequest("the request body is empty; a JSON object is expected", code="invalid_json")
    try:
        value = json.loads(body, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"the request body is not valid JSON: {str(err)[:120]}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    try:
        orjson.dumps(value)  # what is stored must encode: no lone surrogates, nesting within 254
    except orjson.JSONEncodeError as err:
        raise BadRequest(f"the request body cannot be stored as JSON: {err}", code="invalid_json") from None
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def conversation_fields(body: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(initial_user_msg, repository, selected_branch) of a create request, checked."""
    message = _optional_str(body, "initial_user_msg")
    repository = _optional_str(body, "repository") or None
    # `.` and `..` match the pattern, and would name folders outside the agents' workspace.
    if repository is not None and (not REPOSITORY.fullmatch(repository)
                                   or any(part in (".", "..") for part in repository.split("/"))):
        raise BadRequest("repository must look like 'owner/name'")
    branch = _optional_str(body, "selected_branch") or None
    if branch is not None and (len(branch) > MAX_BRANCH or any(ord(c) < 32 for c in branch)):
        raise BadRequest(f"selected_branch must be at most {MAX_BRANCH} printable characters")
    return message, repository, branch


def conversation_title(message: str | None, cid: str) -> str:
    """A title: the first line of the first message, else one made from the id."""
    first_line = (message or "").strip().split("\n", 1)[0].strip()
    if not first_line:
        return f"Conversation {cid[:8]}"
    return first_line if len(first_line) <= 80 else first_line[:79] + "…"


def action(body: dict[str, Any]) -> dict[str, Any]:
    """A posted action, checked: its kind in `type` or `action`, and its message content."""
    kind_field = "type" if "type" in body else "action" if "action" in body else None
    if kind_field is None:
        raise BadRequest("an action needs 'type' (or OpenHands' 'action') naming its kind")
    kind = body[kind_field]
    if not isinstance(kind, str) or not ACTION_TYPE.fullmatch(kind):
        raise BadRequest(f"'{kind_field}' must be 1 to 64 characters of a-z, 0-9 and _")
    for field in SERVER_FIELDS:
        if field in body and not (field == "source" and body[field] == "user"):
            raise BadRequest(f"'{field}' is set by the server and cannot be posted")
    if body.get("type") == "user_message":
        content = body.get("content")
        if not isinstance(content, str) or not content:
            raise BadRequest("a user_message needs a non-empty string 'content'")
    if body.get("action") == "message":
        args = body.get("args")
        content = args.get("content") if isinstance(args, dict) else None
        if not isinstance(content, str) or not content:
            raise BadRequest("a message action needs a non-empty string 'args.content'")
    return {k: v for k, v in body.items() if k != "source"}


def idempotency_key(raw: str | None) -> str | None:
    """The SHA-256 of an Idempotency-Key header (stored hashed), None when absent."""
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_IDEMPOTENCY_KEY or not raw.isprintable() or not raw.isascii():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return hashlib.sha256(raw.encode()).hexdigest()


def body_digest(body: bytes) -> str:
    """A digest of a request body, to tell a retry from a different request under the same key."""
    return hashlib.sha256(body).hexdigest()[:32]


def agent_kind(fields: dict[str, Any]) -> str:
    """What a posted action is to the agents: 'message' (answered), 'stop' (ends the run going) or ''."""
    if fields.get("type") == "user_message" or fields.get("action") == "message":
        return "message"
    if fields.get("type") == "stop" or fields.get("action") == "stop":
        return "stop"
    # OpenHands' own stop button posts this.
    args = fields.get("args")
    if fields.get("action") == "change_agent_state" and isinstance(args, dict) and args.get("agent_state") == "stopped":
        return "stop"
    return ""
