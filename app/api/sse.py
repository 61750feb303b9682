"""The live event stream of a conversation (Server-Sent Events)."""
from __future__ import annotations

import os
import secrets
import threading
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from .. import metrics, ratelimit, replies, sse, stream, validation
from ..auth import Presented, authenticate_with, current_caller, presented, self_authenticating
from ..errors import BadRequest, NotFound, ServiceUnavailable, TooManyRequests
from ..hub import Hub, HubUnavailable, gevent_ready
from ..keys import conv_reply_key
from ..store import (
    CONVERSATION_ID,
    MAX_EVENT_ID,
    Store,
    conv_events_key,
    conv_meta_key,
    entry_id,
    stored_events,
    visible_owner,
)
from ..subscriber import Subscriber
from . import get_store

bp = Blueprint("sse", __name__, url_prefix="/api/sse")
# Made at import, in the worker after gevent patched threading (the app is never preloaded).
_HUB_LOCK = threading.Lock()

# Events read with the caller's checks (a conversation followed here already); past them the stream reads on.
PREFETCH = 100
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass every event on at once
}


def get_hub() -> Hub:
    """The worker's hub, started on the first stream (never at import, never before a fork)."""
    if not gevent_ready():
        raise ServiceUnavailable(
            "event streams need gunicorn's gevent worker (sockets are not patched)", code="streaming_unavailable"
        )
    app = current_app
    hub = app.extensions.get("hub")
    if hub is None or hub.pid != os.getpid():
        # Making a hub may wait on Redis (on a Cluster it asks the masters' versions): streams
        # arriving meanwhile must wait for that one, not make hubs of their own that nothing ends.
        with _HUB_LOCK:
            hub = app.extensions.get("hub")
            if hub is None or hub.pid != os.getpid():
                hub = app.extensions["hub"] = Hub(
                    app.config["REDIS_URL"],
                    get_store(),
                    queue_max=app.config["SSE_QUEUE_MAX"],
                    stream_cap=app.config["SSE_MAX_STREAMS_PER_USER"],
                    lease_ttl=app.config["SSE_LEASE_SECONDS"],
                    coalesce=app.config["SSE_COALESCE_MS"] / 1000,
                    stall_seconds=app.config["SSE_STALL_SECONDS"],
                )
    return hub


def _acquire_slot(store: Store, user_id: str, connection_id: str) -> None:
    # The lease expires by itself unless the hub refreshes it, which it does only for a stream it
    # holds: a stream that never starts, or whose worker is killed, frees its slot within the TTL.
    config = current_app.config
    cap = config["SSE_MAX_STREAMS_PER_USER"]
    if cap and not store.acquire_stream(user_id, connection_id, cap, config["SSE_LEASE_SECONDS"]):
        raise TooManyRequests(f"at most {cap} streams may be open per user", headers={"Retry-After": "5"})


def _chunked_plain_http(environ: dict, sock: object) -> bool:
    """Whether gunicorn sends this response in HTTP/1.1 chunks on a plain (not TLS) socket.

    Only then may the hub write to the socket itself; otherwise every byte goes through gunicorn.
    """
    return (
        sock is not None
        and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        and environ.get("REQUEST_METHOD") == "GET"
        and not hasattr(sock, "cipher")  # TLS sockets have one; their bytes must go through ssl
    )


def _streamed_with(hub: Hub, creds: Presented | None, cid: str) -> bool:
    """Whether the key these credentials name has a stream of `cid` open in this worker (not yet proven)."""
    return creds is not None and any(sub.conversation_id == cid for sub in hub.by_key.get(creds.key_id, ()))


def _running_hub() -> Hub | None:
    """The worker's hub if it has started one (never starts it)."""
    hub = current_app.extensions.get("hub")
    return hub if hub is not None and hub.pid == os.getpid() else None


@bp.get("/conversations/<cid>/events")
@self_authenticating
def stream_events(cid: str) -> Response:
    """Every event after the client's last one, then each new one as it is written."""
    config = current_app.config
    try:
        latest = validation.resume_point(request.headers.get("Last-Event-ID"), request.args.get("latest_event_id"))
        providers = validation.providers_set(request.args.get("providers_set"), config["PROVIDERS"])
    except BadRequest:
        current_caller()  # a 401 comes before a 400, as on every route
        raise
    store = get_store()
    known = CONVERSATION_ID.fullmatch(cid) is not None  # another id never reaches Redis (a `}` breaks the hash tag)
    # A conversation this worker follows already (another tab's): what is stored after the
    # client's id is read in the same round trip, and the store is not read again after the
    # stream registers (when `gapless` says nothing can fall between the two).
    running = _running_hub()
    conv = stream.followed(running, cid) if known and request.method == "GET" else None
    if conv is not None and running is not None and not _streamed_with(running, presented(), cid):
        # Only for the key that streams it already: another user's id then reads what a missing one
        # does (nothing stored), and answers its 404 as fast (bench/isolation_timing.py --streaming).
        conv = None
    prefetch = conv is not None and latest < MAX_EVENT_ID
    # Reply deltas the hub hands out from now on may fall between the reply read below and the
    # stream's registration: then the reply is read again after it (see `caught_up`).
    deltas_before = conv.deltas if conv is not None else 0
    limit = ratelimit.PipelinedCheck("stream", wanted=request.method == "GET")  # a HEAD opens nothing

    def reads(pipe: Any) -> None:
        if known:
            pipe.hmget(conv_meta_key(cid), "owner", "pending", "agent_state")
        if prefetch:
            pipe.xrange(conv_events_key(cid), min=entry_id(latest + 1), max="+", count=PREFETCH)
            pipe.get(conv_reply_key(cid))  # after the XRANGE: as of the same moment (stream.read_page_and_reply)
        limit.queue(pipe)  # last

    # The key's record, the rate limit, the conversation's owner (and what is stored) in one round trip,
    # checked in that order: a caller over its limit learns nothing of conversations.
    caller, answers = authenticate_with(reads)
    limit.judge(answers)
    if (visible_owner(*answers[0][:2]) if known else None) != caller.user_id:
        raise NotFound("no such conversation")
    if request.method == "HEAD":  # the headers a GET would get, and no stream behind them
        return Response(headers=STREAM_HEADERS)
    hub = get_hub()
    connection_id = secrets.token_urlsafe(12)
    opening = sse.opening(config["SSE_RETRY_MS"], {
        "type": "connection_established",
        "connection_id": connection_id,
        "conversation_id": cid,
        "latest_event_id": latest,
        "providers_set": providers,
        "agent_state": answers[0][2].decode() if answers[0][2] is not None else None,
    })
    sock = request.environ.get("gunicorn.socket")
    # The stream resumes after the last event it has sent: the client's id, or the last one read above.
    resume = latest
    page = stored_events(answers[1]) if prefetch else []
    if page:
        opening += stream.page_frames(latest, page)
        resume = page[-1][0]
        metrics.delivered_stored(len(page))
    if hub.closing:
        # This worker is exiting, yet got the request (a kept-alive connection it still holds):
        # a 503 would close a browser's EventSource for good, so answer with what is stored and
        # end; it reconnects (on a new connection, which a live worker answers).
        sub = Subscriber(cid, caller.user_id, caller.key_id, "", resume, sock)
        return Response(stream.stored_then_end(store, sub, opening), headers=STREAM_HEADERS)
    _acquire_slot(store, caller.user_id, connection_id)
    sub = Subscriber(cid, caller.user_id, caller.key_id, connection_id if config["SSE_MAX_STREAMS_PER_USER"] else "",
                     resume, sock, chunked=_chunked_plain_http(request.environ, sock))
    sub.request_id, sub.first_id = g.get("request_id", ""), latest
    try:
        hub.subscribe(sub)  # on failure it has forgotten the stream and given its slot back
    except HubUnavailable as err:
        if hub.closing:  # began to exit while the slot was taken
            return Response(stream.stored_then_end(store, sub, opening), headers=STREAM_HEADERS)
        raise ServiceUnavailable(str(err), headers={"Retry-After": "1"}) from None
    # A full page may have more behind it: then the store is read on from its last event (and the
    # reply in progress after it), as when a delta was handed out while this stream registered.
    caught_up = prefetch and len(answers[1]) < PREFETCH and stream.gapless(hub, conv, resume) \
        and conv.deltas == deltas_before
    if caught_up:
        opening += replies.snapshot(sub, answers[2])
    body = stream.stream(hub, store, sub, opening, config["SSE_HEARTBEAT_SECONDS"], caught_up=caught_up)
    return Response(body, headers=STREAM_HEADERS)
