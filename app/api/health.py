"""Liveness for load balancers and ops: does this worker reach Redis, how many streams it holds."""
from __future__ import annotations

import os

from flask import Blueprint, Response, current_app

from ..errors import error_response, json_response
from . import get_store

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """200 with this worker's stream counts when Redis answers and its hub reads; 503 otherwise."""
    get_store().redis.ping()
    hub = current_app.extensions.get("hub")
    alive = hub is not None and hub.pid == os.getpid()
    if alive and not hub.reading():
        # Streams here would get pings and no events: a load balancer should look elsewhere.
        return error_response(503, "hub_not_reading", "this worker's event hub is not receiving events",
                              {"Retry-After": "1"})
    return json_response({
        "status": "ok",
        "worker_pid": os.getpid(),
        "streams": hub.stream_count if alive else 0,
        "conversations": len(hub.conversations) if alive else 0,
        "channels": len(hub.listener.wanted) if alive else 0,
    })
