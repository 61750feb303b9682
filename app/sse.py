"""The SSE wire format: pure functions, byte for byte (the stream generator is stream.py)."""
from __future__ import annotations

import json
from typing import Any

import orjson

# A bare comment line: it keeps proxies from timing the stream out and dispatches nothing. A blank
# line after it would end an (empty) event block, which httpx-sse and fetch-event-source hand to
# the application as an event with empty data.
PING = b": ping\n"


def _json(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        # orjson holds 64-bit integers; a client may resume from a larger id (one with no events).
        # What JSON cannot carry raises ValueError, never goes out: NaN (allow_nan) or a lone
        # surrogate (no UTF-8 form: encode() refuses it).
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def named_event(name: str, data: Any) -> bytes:
    """A named event (`event:` line) with JSON data."""
    return b"event: %s\ndata: %s\n\n" % (name.encode(), _json(data))


def opening(retry_ms: int, connection: dict[str, Any]) -> bytes:
    """The first block of a stream: the reconnection delay, then the `connection` event, in one block.

    In a block of its own, `retry:` would be an empty event to the clients that dispatch those.
    """
    return b"retry: %d\n%s" % (retry_ms, named_event("connection", connection))


def event_frame(event_id: int, data: bytes) -> bytes:
    """A conversation event: its id and its stored JSON (one line: compact JSON has no newline)."""
    return b"id: %d\ndata: %s\n\n" % (event_id, data)


def history_truncated(earliest_event_id: int) -> bytes:
    """Says in band that events before `earliest_event_id` are no longer kept."""
    return named_event("history_truncated", {"earliest_event_id": earliest_event_id})


def http_chunk(data: bytes) -> bytes:
    """`data` framed as one HTTP/1.1 chunk (for the hub's direct writes under gunicorn's chunking)."""
    return b"%X\r\n%s\r\n" % (len(data), data)


PING_CHUNK = http_chunk(PING)
