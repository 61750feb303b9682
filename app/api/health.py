"""Probes for load balancers and ops: /healthz (this process works), /readyz (it can serve: Redis answers)."""
from __future__ import annotations

import os

import redis
from flask import Blueprint, Response, current_app

from .. import metrics
from ..errors import error_response, json_response, redis_unavailable
from ..hub import Hub
from . import get_store

bp = Blueprint("health", __name__)


def _hub() -> Hub | None:
    hub = current_app.extensions.get("hub")
    return hub if hub is not None and hub.pid == os.getpid() else None


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: 200 with this worker's stream counts while its hub reads; 503 `hub_not_reading` otherwise.

    Redis is not asked (that is /readyz): a process restarted because Redis is down comes back
    to the same Redis. A hub that cannot read leaves its streams with pings and no events, though.
    """
    hub = _hub()
    if hub is not None and not hub.reading():
        return error_response(503, "hub_not_reading", "this worker's event hub is not receiving events",
                              {"Retry-After": "1"})
    return json_response({
        "status": "ok",
        "worker_pid": os.getpid(),
        "streams": hub.stream_count if hub else 0,
        "conversations": len(hub.conversations) if hub else 0,
        "channels": len(hub.listener.wanted) if hub else 0,
    })


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 when Redis answers a PING and this worker is not shutting down; 503 otherwise."""
    hub = _hub()
    if hub is not None and hub.closing:
        return error_response(503, "shutting_down", "this worker is shutting down", {"Retry-After": "1"})
    try:
        get_store().redis.ping()
    except redis.RedisError as err:
        metrics.redis_error(err, "readyz")
        # Whatever the error (a wrong password too), this process cannot serve: never a 500 here.
        code, message = redis_unavailable(err) or ("redis_unavailable", "the event store does not answer")
        return error_response(503, code, message, {"Retry-After": "1"})
    return json_response({"status": "ok", "worker_pid": os.getpid()})
