"""One exception base for the API; every error becomes the JSON body of API.md."""
from __future__ import annotations

import logging
import re

import orjson
import redis.exceptions
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Machine codes for errors that Werkzeug raises itself (routing, body size, methods).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class ApiError(Exception):
    """An error answered to the client as JSON, with its status and machine code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = headers or {}


class BadRequest(ApiError):
    """Malformed input."""


class Unauthorized(ApiError):
    """Missing or bad credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """The credentials are good but may not be used for this request."""

    status = 403
    code = "forbidden"


class NotFound(ApiError):
    """Unknown, or not the caller's."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """The request contradicts what is stored (an Idempotency-Key reused for another body)."""

    status = 409
    code = "conflict"


class UnsupportedMediaType(ApiError):
    """The body is not JSON."""

    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ApiError):
    """A per-user limit is reached."""

    status = 429
    code = "too_many_requests"


class ServiceUnavailable(ApiError):
    """The service cannot answer now; the client should retry."""

    status = 503
    code = "service_unavailable"


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson."""
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype="application/json")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one error body of API.md."""
    return json_response({"status": "error", "error": code, "message": message}, status, headers)


class ConnectFailed(redis.exceptions.ConnectionError):
    """Connecting, or the health check before a command, failed: no command of ours reached Redis."""


# What the stream loops wait out (no connection, no answer, LOADING); redis_unavailable() covers more.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)

# Redis error codes that mean "the store cannot take this now, retry": (machine code, message).
# The messages are fixed text: Redis's own carry hosts, script names and posted data.
_UNAVAILABLE = {
    "OOM": ("redis_out_of_memory", "the event store is out of memory and refuses writes; retry later"),
    "READONLY": ("redis_read_only", "the event store is a read-only replica now (as after a failover); retry shortly"),
    "LOADING": ("redis_loading", "the event store is loading its data after a restart; retry shortly"),
    "MASTERDOWN": ("redis_master_down", "the event store lost its link to its primary; retry shortly"),
    "NOREPLICAS": ("redis_no_replicas", "the event store has too few replicas to accept writes; retry shortly"),
    "CLUSTERDOWN": ("redis_cluster_down", "the event store cluster is down; retry shortly"),
    "TRYAGAIN": ("redis_try_again", "the event store is moving this data between nodes; retry shortly"),
    "BUSY": ("redis_busy", "the event store is busy with a long-running script; retry shortly"),
}
_UNREACHABLE = ("redis_unavailable", "the event store is unreachable; retry shortly")

# The classes redis-py makes of those codes; subclasses first (MasterDownError is a ClusterDownError,
# BusyLoadingError a ConnectionError).
_CLASS_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    # The cluster client's own, after redirections (TRYAGAIN, MOVED) that went on too long.
    (redis.exceptions.ClusterError, "TRYAGAIN"),
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
)
# redis-py's pipeline prefix: greedy, so a posted ") of pipeline caused error: " cannot end it early.
_PIPELINE = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: ", re.S)
# Redis 6.2 wraps an error inside EVALSHA as a plain ERR; its own checks (OOM, READONLY, NOREPLICAS)
# keep their "-". Redis 7 keeps the code first and appends " script: <sha>, on @user_script:N.".
_SCRIPT = re.compile(r"(?:ERR )?Error running script \(call to [^)]*\): (?:@\w+: ?\d+: )*-?")
_CODE = re.compile(r"[A-Z]+\b")


def redis_unavailable(err: BaseException) -> tuple[str, str] | None:
    """(machine code, message) if `err` means the store cannot serve now and a retry may work, else None."""
    for cls, code in _CLASS_CODES:
        if isinstance(err, cls):
            return _UNAVAILABLE[code]
    if isinstance(err, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return _UNREACHABLE
    if not isinstance(err, redis.exceptions.ResponseError) or not err.args:
        return None
    # Codes redis-py does not know (NOREPLICAS, BUSY) and wrapped script errors are plain ResponseErrors.
    message = str(err.args[0])
    if match := _PIPELINE.match(message):
        message = message[match.end():]
    if match := _SCRIPT.match(message):
        message = message[match.end():]
    code = _CODE.match(message)
    return _UNAVAILABLE.get(code.group()) if code else None


def init_app(app: Flask) -> None:
    """Register the handlers that turn every exception into a JSON error."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return error_response(err.status, err.code, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        headers = {k: v for k, v in err.get_headers() if k.lower() != "content-type"}
        message = err.description or err.name
        if status == 413:
            limit = app.config["MAX_EVENT_BYTES"]
            message = f"request body is larger than the limit of {limit} bytes"
        return error_response(status, HTTP_CODES.get(status, "http_error"), message, headers)

    @app.errorhandler(redis.exceptions.RedisError)
    def _redis_error(err: redis.exceptions.RedisError) -> Response:
        from . import metrics  # here, not at the top: metrics uses this module's helpers

        metrics.redis_error(err, "request")
        unavailable = redis_unavailable(err)
        if unavailable is not None:
            code, message = unavailable
            log.warning("Redis unavailable (%s): %s", code, type(err).__name__)
            return error_response(503, code, message, {"Retry-After": "1"})
        log.exception("Redis error")
        return error_response(500, "internal_error", "internal error")

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
