"""Logs: one line per request and per stream end, JSON or text, each with the request's id; never a secret.

What a line may carry is fixed here: the method, the route (the URL rule, never the raw path or
its query string, where a careless client may have put a key), the status, the duration, the
request id and the caller's user id. Headers, cookies, bodies and query strings are never logged.
"""
from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson
from flask import Flask, Response, g, request

from . import metrics

if TYPE_CHECKING:
    from .subscriber import Subscriber

REQUEST_ID_HEADER = "X-Request-ID"
# A client's (or proxy's) id is kept when it is short and plain: it goes into every log line.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

request_log = logging.getLogger("app.request")
stream_log = logging.getLogger("app.stream")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


JsonFormatter.converter = time.gmtime  # type: ignore[assignment]


def configure(log_format: str) -> None:
    """Set the root logger up once per process (a no-op when something set it up already, as pytest does)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def request_id() -> str:
    """The id of this request: the client's valid X-Request-ID, else one made here."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if VALID_REQUEST_ID.fullmatch(given) else secrets.token_hex(16)


def _text(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and v != "")


def init_app(app: Flask) -> None:
    """Give every request an id (echoed in X-Request-ID), and log and measure each one."""

    @app.before_request
    def _start() -> None:
        g.request_id = request_id()
        g.started = time.perf_counter()

    @app.after_request
    def _done(response: Response) -> Response:
        rid = g.get("request_id") or request_id()
        response.headers[REQUEST_ID_HEADER] = rid
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        rule = request.url_rule
        route = rule.rule if rule is not None else "(unmatched)"
        if route == "/metrics":
            return response  # scrapes every few seconds would drown the requests that matter
        metrics.request_done(route, request.method, response.status_code, seconds)
        caller = g.get("caller")
        fields = {"method": request.method, "route": route, "status": response.status_code,
                  "duration_ms": round(seconds * 1000, 2), "request_id": rid,
                  "user_id": caller.user_id if caller is not None else None}
        request_log.info("%s %s %d %.1fms %s", request.method, route, response.status_code, seconds * 1000,
                         _text({"request_id": rid, "user_id": fields["user_id"]}), extra={"fields": fields})
        return response


def stream_ended(sub: Subscriber, reason: str) -> None:
    """Count a stream's end and log it: how long it was open, the events it sent, why it ended."""
    metrics.stream_ended(reason)
    fields = {"event": "stream_end", "conversation_id": sub.conversation_id, "reason": reason,
              "duration_ms": round((time.monotonic() - sub.opened) * 1000, 1),
              "events_sent": max(0, sub.last_sent - sub.first_id), "request_id": sub.request_id,
              "user_id": sub.user_id}
    stream_log.info("stream ended: %s", _text({k: v for k, v in fields.items() if k != "event"}),
                    extra={"fields": fields})
