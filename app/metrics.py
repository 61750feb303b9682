"""Prometheus metrics: what each process counts, and GET /metrics, summed over gunicorn's workers.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker starts: every
worker then keeps its values in a small mmap'd file of its own there, and a scrape of any worker
sums them all (prometheus_client's multiprocess mode). Without it (the test client, one process)
the values live in this process and a scrape shows them alone. An agent worker is another
process, usually without that directory: it serves its own counters on AGENT_METRICS_PORT.

What the hub's fan-out adds to its hot path: one counter increment per pub/sub read (events x
subscribers reached, summed as integers while dispatching) and one histogram observation of the
read lag per read, never per subscriber or per event.
"""
from __future__ import annotations

import gc
import hmac
import ipaddress
import logging
import os
import time
from datetime import datetime

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .errors import error_response, redis_unavailable

log = logging.getLogger(__name__)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AGENT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

OPEN_STREAMS = Gauge("openhands_open_streams", "SSE streams open now (summed over the live workers)",
                     multiprocess_mode="livesum")
EVENTS_APPENDED = Counter("openhands_events_appended", "events stored by this service's posts and agents",
                          ["source"])
EVENTS_DELIVERED = Counter(
    "openhands_events_delivered",
    "events handed to streams: by the hub (live: each event once per stream it reached) or read from the store "
    "by a stream catching up", ["via"])
HUB_READ_LAG = Histogram(
    "openhands_hub_read_lag_seconds",
    "per pub/sub read of the hub: the time from the last event's timestamp (the appending process's clock) to its "
    "hand-out to the streams", buckets=LAG_BUCKETS)
SUBSCRIBER_OVERFLOWS = Counter("openhands_subscriber_overflows", "streams ended for falling SSE_QUEUE_MAX behind")
STREAM_ENDS = Counter("openhands_stream_ends", "SSE streams ended, by reason", ["reason"])
RATE_LIMITED = Counter("openhands_rate_limited", "requests refused 429 rate_limited by a per-key rate limit, by "
                       "kind (post, stream)", ["kind"])
REDIS_ERRORS = Counter("openhands_redis_errors", "Redis errors met, by kind and where", ["kind", "where"])
REQUESTS = Counter("openhands_http_requests", "HTTP requests answered, by route (the URL rule) and status",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "openhands_http_request_duration_seconds",
    "time to answer a request, by route (a stream: until its response starts)", ["route", "method"],
    buckets=LATENCY_BUCKETS)
AGENT_ACTIONS = Counter("openhands_agent_actions", "user messages an agent worker answered, by agent and outcome",
                        ["agent", "outcome"])
# Set from a count made in the worker every GREENLET_COUNT_SECONDS (or, with 0, at each scrape it
# answers): a greenlet left behind by a dropped connection shows as growth here. One series per live worker pid.
GREENLETS = Gauge("openhands_greenlets", "greenlets alive in the worker (spawned or running, not finished)",
                  multiprocess_mode="liveall")
_greenlets_counted_at_scrape = [True]
AGENT_SECONDS = Histogram("openhands_agent_action_duration_seconds", "time an agent worker took to answer a message",
                          ["agent"], buckets=AGENT_BUCKETS)

_delivered_hub = EVENTS_DELIVERED.labels("hub")
_delivered_store = EVENTS_DELIVERED.labels("store")
_TIMESTAMP = b'"timestamp":"'


def delivered_live(count: int) -> None:
    """Count `count` event hand-outs by the hub (events x streams of one read)."""
    if count:
        _delivered_hub.inc(count)


def delivered_stored(count: int) -> None:
    """Count events a stream read from the store itself."""
    _delivered_store.inc(count)


def observe_read_lag(data: bytes) -> None:
    """Observe the age of an announced event (`{"id":N,"timestamp":"..."`), if it says when it was made."""
    start = data.find(_TIMESTAMP, 6, 40)
    if start < 0:
        return
    start += len(_TIMESTAMP)
    end = data.find(b'"', start, start + 40)
    try:
        made = datetime.fromisoformat(data[start:end].decode()).timestamp()
    except ValueError:
        return
    HUB_READ_LAG.observe(max(0.0, time.time() - made))


def redis_error(err: BaseException, where: str) -> None:
    """Count a Redis error by kind: its machine code when it means "unavailable", else its class."""
    unavailable = redis_unavailable(err)
    REDIS_ERRORS.labels(unavailable[0] if unavailable else type(err).__name__, where).inc()


def stream_ended(reason: str) -> None:
    """Count a stream's end (and its overflow)."""
    STREAM_ENDS.labels(reason).inc()


def request_done(route: str, method: str, status: int, seconds: float) -> None:
    """Count a request and its latency (the method outside the usual ones as OTHER: labels stay few)."""
    method = method if method in METHODS else "OTHER"
    REQUESTS.labels(route, method, str(status)).inc()
    REQUEST_SECONDS.labels(route, method).observe(seconds)


def agent_action(agent: str, outcome: str, seconds: float) -> None:
    """Count one message an agent answered, and how long that took."""
    AGENT_ACTIONS.labels(agent, outcome).inc()
    AGENT_SECONDS.labels(agent).observe(seconds)


def count_greenlets() -> int:
    """Greenlets of this process spawned and not finished, found among the objects the garbage collector tracks.

    greenlet keeps no registry of its own (gevent.util's tree walks gc the same way). A gunicorn
    worker freezes what it holds at start-up (gunicorn.conf.py tune_gc): the few greenlets made
    before (the main one, gevent's hub, the exit watch, the refresher below) are not seen, every
    one made since is: what grows with connections and streams. The walk is O(objects), about
    60 ms for 500k, so it runs only every GREENLET_COUNT_SECONDS (or at a scrape, with 0).
    """
    try:
        from greenlet import greenlet
    except ImportError:  # not under gevent: no greenlets at all
        return 0
    # bool(): a raw greenlet started and not finished; a gevent Greenlet spawned (scheduled or
    # running) and not finished. Not `not dead`: a greenlet never started (one killed before its
    # start) is not dead either, and lingers as garbage until a full collection.
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and bool(obj))


def refresh_greenlets() -> None:
    """Set this process's greenlet gauge from a fresh count."""
    GREENLETS.set(count_greenlets())


def _refresh_greenlets_forever(seconds: int) -> None:
    import gevent

    while True:
        gevent.sleep(seconds)
        try:
            refresh_greenlets()
        except Exception:  # noqa: BLE001 - a gauge must never take the worker down
            log.exception("counting greenlets failed")


def start_greenlet_gauge(seconds: int) -> None:
    """Count now, then every `seconds` in a gunicorn gevent worker (multiprocess); 0: at each scrape instead."""
    import gevent.monkey

    # The walk pauses the whole worker (every stream): a scrape, which anyone allowed may send
    # at any rate, must not cause it, so with a period set a scrape answers with the last count.
    _greenlets_counted_at_scrape[0] = seconds == 0
    if MULTIPROCESS and gevent.monkey.is_module_patched("socket"):
        # Only a gunicorn worker counts: another process with the metrics folder in its
        # environment (a flask command) would leave a series of its own behind.
        refresh_greenlets()
        if seconds:
            gevent.spawn(_refresh_greenlets_forever, seconds)


def is_loopback(address: str | None) -> bool:
    """Whether a client address is this host's own (127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def allowed(token: str) -> bool:
    """Whether this request may read the metrics: from loopback, or with the configured bearer token."""
    if token:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
    return is_loopback(peer_address())


def peer_address() -> str | None:
    """The address of the socket's peer: ProxyFix (TRUSTED_PROXIES) puts a forwarded client in REMOTE_ADDR.

    That address comes from X-Forwarded-For, which a client reaching gunicorn directly writes
    itself (`X-Forwarded-For: 127.0.0.1`): only the real peer says whether the caller is local.
    """
    original = request.environ.get("werkzeug.proxy_fix.orig")
    if isinstance(original, dict):
        return original.get("REMOTE_ADDR")
    return request.environ.get("REMOTE_ADDR")


def render() -> tuple[bytes, str]:
    """The text exposition of every process's metrics (all workers' in multiprocess mode)."""
    if _greenlets_counted_at_scrape[0]:
        refresh_greenlets()  # this worker's count is as of now; the others' as of their last scrape
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus text format; 404 to a caller that is neither on loopback nor holds METRICS_TOKEN."""
    if not allowed(current_app.config["METRICS_TOKEN"]):
        # 404, not 403: from outside, the endpoint does not exist (nothing to probe for).
        return error_response(404, "not_found", "not found")
    body, content_type = render()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


# Every reason a stream ends with (app/stream.py, app/hub.py, app/subscriber.py): a labelled
# series only exists from its first count, so rate() would miss the first end of each reason.
STREAM_END_REASONS = ("closed", "deleted", "disconnected", "error", "overflow", "redis_unavailable", "revoked",
                      "shutdown", "stalled")


def warm_up() -> None:
    """Create the series of the known label values at zero, so they exist from the start."""
    for reason in STREAM_END_REASONS:
        STREAM_ENDS.labels(reason)


def init_app(app: Flask) -> None:
    """Add GET /metrics."""
    warm_up()
    start_greenlet_gauge(app.config["GREENLET_COUNT_SECONDS"])
    app.register_blueprint(bp)


def serve_agent_metrics(port: int) -> None:
    """Serve this process's metrics on 127.0.0.1:`port` (an agent worker; loopback only)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr="127.0.0.1")
    log.info("agent worker metrics on http://127.0.0.1:%d/metrics", port)
