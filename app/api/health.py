"""Probes for load balancers and ops: /healthz (this process works), /readyz (it can serve: Redis, hub reading)."""
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
    """Liveness: 200 with this worker's stream counts while its hub's loops run; 503 `hub_not_running` otherwise.

    Redis is not asked, and a hub whose pub/sub connection is down (Redis is) still counts as
    live: a process restarted because Redis is down comes back to the same Redis, so a restarter
    watching this would restart every host during an outage. That is /readyz's business. Only a
    dead loop (a greenlet that has exited: it never restarts) makes this worker need a restart.
    """
    hub = _hub()
    if hub is not None and not hub.running():
        return error_response(503, "hub_not_running", "this worker's event hub has stopped", {"Retry-After": "1"})
    return json_response({
        "status": "ok",
        "worker_pid": os.getpid(),
        "streams": hub.stream_count if hub else 0,
        "conversations": len(hub.conversations) if hub else 0,
        "channels": len(hub.listener.wanted) if hub else 0,
    })


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 when Redis answers a PING and this worker's hub (if it has one) receives announcements.

    503 `shutting_down` when the worker is exiting, `redis_unavailable` (or Redis's own code) when
    Redis does not answer, `hub_not_reading` when it does but the hub's pub/sub connection is not up
    (its streams would get pings and no events).
    """
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
    if hub is not None and not hub.reading():
        return error_response(503, "hub_not_reading", "this worker's event hub is not receiving events",
                              {"Retry-After": "1"})
    return json_response({"status": "ok", "worker_pid": os.getpid()})
