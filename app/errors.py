"""One exception base for the API; every error becomes the JSON body of API.md."""
from __future__ import annotations

import logging

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


REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


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
        if isinstance(err, REDIS_DOWN):
            log.warning("Redis unavailable: %s", type(err).__name__)
            return error_response(
                503, "redis_unavailable", "the event store is unreachable; retry shortly", {"Retry-After": "1"}
            )
        log.exception("Redis error")
        return error_response(500, "internal_error", "internal error")

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
