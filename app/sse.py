"""The SSE wire format (pure functions) and the generator behind every event stream."""
from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
import redis

from .errors import redis_unavailable

if TYPE_CHECKING:
    from .hub import Hub, Subscriber
    from .store import Store

log = logging.getLogger(__name__)

# A bare comment line: it keeps proxies from timing the stream out and dispatches nothing. A blank
# line after it would end an (empty) event block, which httpx-sse and fetch-event-source hand to
# the application as an event with empty data.
PING = b": ping\n"
CATCH_UP_PAGE = 500


def _json(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        # orjson holds 64-bit integers; a client may resume from a larger id (one with no events).
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


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


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client has closed its end (a non-blocking peek reads EOF or fails)."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def catch_up(store: Store, sub: Subscriber, upto: int | None = None) -> Iterator[bytes]:
    """Frames of the stored events after the subscriber's last one (up to `upto`), page by page.

    A first event later than the next expected id means retention trimmed the ones between:
    that is said in band with `history_truncated` before the events go out.
    """
    while upto is None or sub.last_sent < upto:
        page = store.read_after(sub.conversation_id, sub.last_sent, CATCH_UP_PAGE)
        if upto is not None:
            page = [(n, data) for n, data in page if n <= upto]
        if not page:
            return
        frames = [history_truncated(page[0][0])] if page[0][0] > sub.last_sent + 1 else []
        frames.extend(event_frame(n, data) for n, data in page)
        sub.last_sent = page[-1][0]
        yield b"".join(frames)
        if len(page) < CATCH_UP_PAGE:
            return


def live_frames(store: Store, sub: Subscriber) -> bytes:
    """The frames of the subscriber's pending batches that it has not sent yet, in id order."""
    out: list[bytes] = []
    for batch in sub.take():
        if batch.last_id <= sub.last_sent:
            continue
        if batch.first_id > sub.last_sent + 1:
            # Never expected (the hub reads every entry), but a gap must not become a loss.
            out.extend(catch_up(store, sub, upto=batch.first_id - 1))
        if batch.first_id == sub.last_sent + 1:
            out.append(batch.joined)
        else:
            out.extend(frame for n, frame in batch.items if n > sub.last_sent)
        sub.last_sent = batch.last_id
    return b"".join(out)


def wait(sub: Subscriber, heartbeat: float) -> bool:
    """Wait for the hub or the heartbeat; False on the heartbeat. A client gone away ends the stream."""
    woken = sub.wake.wait(timeout=heartbeat)
    sub.wake.clear()
    if sub.readable:
        sub.readable = False
        if sub.sock is not None and peer_closed(sub.sock):
            sub.end("disconnected")
    return bool(woken)


def flush(store: Store, sub: Subscriber) -> None:
    """Write, from the stream's greenlet, what the hub could not write at once, until nothing is left."""
    sub.busy = True
    while True:
        frames = live_frames(store, sub)
        data = sub.outbuf + (http_chunk(frames) if frames else b"")
        sub.outbuf = b""
        if not data:
            break
        sub.sock.sendall(data)
    sub.busy = False


def follow_direct(store: Store, sub: Subscriber, heartbeat: float) -> None:
    """The live part of a stream whose batches the hub writes itself; this greenlet only waits.

    It takes the socket over when a write would block (or a batch needs filtering), for pings,
    and to close: a half-written chunk is always completed, so the framing stays valid.
    """
    sub.direct = True
    while True:
        woken = wait(sub, heartbeat)
        reason = sub.end_reason
        if reason is not None:
            if reason in ("deleted", "shutdown"):
                flush(store, sub)
            elif reason != "disconnected" and sub.outbuf:
                sub.sock.sendall(sub.outbuf)
            return
        if sub.busy or sub.pending:
            flush(store, sub)
        elif not woken:
            sub.busy = True
            sub.sock.sendall(PING_CHUNK)
            flush(store, sub)


def stored_then_end(store: Store, sub: Subscriber, opening: bytes) -> Iterator[bytes]:
    """The body of a stream that a worker on its way out answers: the opening and what is stored."""
    yield opening
    try:
        yield from catch_up(store, sub)
    except redis.RedisError as err:
        if redis_unavailable(err) is None:
            raise


def stream(hub: Hub, store: Store, sub: Subscriber, opening: bytes, heartbeat: float) -> Iterator[bytes]:
    """The body of an SSE response: opening, stored events, then live ones; pings while idle."""
    try:
        hub.started(sub)
        yield opening
        yield from catch_up(store, sub)
        if sub.fd is not None:
            # What arrived during the catch-up goes out through gunicorn; then the hub writes.
            while sub.pending and sub.end_reason is None:
                data = live_frames(store, sub)
                if data:
                    yield data
            if sub.end_reason is None:
                follow_direct(store, sub, heartbeat)
            return
        while True:
            woken = wait(sub, heartbeat)
            if sub.end_reason is not None:
                # What is already queued still goes out before a deletion/shutdown ends the stream.
                if sub.end_reason in ("deleted", "shutdown"):
                    tail = live_frames(store, sub)
                    if tail:
                        yield tail
                return
            data = live_frames(store, sub) if woken else b""
            yield data or PING
    except redis.RedisError as err:
        reason = redis_unavailable(err)
        if reason is None:
            raise
        log.info("stream %s ended: Redis unavailable during catch-up (%s)", sub.connection_id, reason[0])
    except OSError:
        pass  # the client went away during a write of ours
    finally:
        hub.unsubscribe(sub)
