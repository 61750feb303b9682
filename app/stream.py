"""The body of every SSE response: the opening, what is stored after the client's id, then live events.

A stream opened in the middle of a reply also gets the reply so far (one delta at offset 0) after
its catch-up; live reply deltas go out at their place among the events (replies.py).
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis

from . import logs, metrics, replies
from .errors import redis_unavailable
from .keys import conv_events_key, conv_reply_key, entry_id, event_id_of
from .replies import Delta
from .sse import PING, PING_CHUNK, event_frame, history_truncated, http_chunk
from .store import MAX_EVENT_ID

if TYPE_CHECKING:
    from .hub import Conversation, Hub, Subscriber
    from .store import Store

log = logging.getLogger(__name__)

CATCH_UP_PAGE = 500
DRAIN_BYTES = 65536
# The most one yield hands gunicorn to send: its write finishing is the stream's progress (see
# `pieces`), so a client taking less than this in SSE_STALL_SECONDS counts as stalled.
WRITE_PIECE = 65536


def client_gone(sock: socket.socket) -> bool:
    """Whether the client closed its end; anything it sent meanwhile is read and dropped.

    A stream's connection is never used for another request (the response says
    `Connection: close`), so a pipelined request after it is dropped rather than left in the
    buffer, where it would keep the socket readable and blind the disconnect watcher.
    """
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        while True:
            if not sock.recv(DRAIN_BYTES):
                return True
    except (BlockingIOError, ssl.SSLWantReadError):  # nothing more to read now (TLS says it its way)
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def pieces(sub: Subscriber, data: bytes) -> Iterator[bytes]:
    """`data` in pieces for gunicorn to send, the stream stamped as waiting on its client while each goes out.

    gunicorn resumes the generator only once it has sent what it yielded: the stamp is cleared
    then, and a piece still going out after SSE_STALL_SECONDS gets the stream ended (hub's check).
    """
    for start in range(0, len(data), WRITE_PIECE):
        sub.stalled_since = time.monotonic()
        yield data[start:start + WRITE_PIECE]  # the whole of a short one: the same object, no copy
        sub.stalled_since = 0.0


def page_frames(after: int, page: list[tuple[int, bytes]]) -> bytes:
    """The frames of a page of stored events read after event `after`.

    A first event later than the next expected id means retention trimmed the ones between:
    that is said in band with `history_truncated` before the events go out.
    """
    frames = [history_truncated(page[0][0])] if page[0][0] > after + 1 else []
    frames.extend(event_frame(n, data) for n, data in page)
    return b"".join(frames)


def catch_up(store: Store, sub: Subscriber, upto: int | None = None) -> Iterator[bytes]:
    """Frames of the stored events after the subscriber's last one (up to `upto`), page by page."""
    while upto is None or sub.last_sent < upto:
        page = store.read_after(sub.conversation_id, sub.last_sent, CATCH_UP_PAGE)
        if upto is not None:
            page = [(n, data) for n, data in page if n <= upto]
        if not page:
            return
        frames = page_frames(sub.last_sent, page)
        sub.last_sent = page[-1][0]
        metrics.delivered_stored(len(page))
        yield frames
        if len(page) < CATCH_UP_PAGE:
            return


def read_page_and_reply(store: Store, cid: str, after: int) -> tuple[list, bytes | None]:
    """A page of stored events after `after` (XRANGE entries), and the reply in progress read just after it.

    In one round trip: the GET rides in the XRANGE's pipeline (same slot), placed after it, so a
    complete page and the reply are as of the same moment (see replies.snapshot).
    """
    pipe = store.redis.pipeline(transaction=False)
    pipe.xrange(conv_events_key(cid), min=entry_id(after + 1), max="+", count=CATCH_UP_PAGE)
    pipe.get(conv_reply_key(cid))
    entries, reply = pipe.execute()
    return entries, reply


def opening_catch_up(store: Store, sub: Subscriber) -> Iterator[bytes]:
    """Frames of every stored event after the subscriber's last one, then of the reply in progress, if any."""
    if sub.last_sent >= MAX_EVENT_ID:
        return  # no event is ever past it, nor any delta (they would be older than what it says it has)
    after = sub.last_sent
    while True:
        entries, reply = read_page_and_reply(store, sub.conversation_id, after)
        # An entry not written by us (no event field) is skipped, as Store.read_after does.
        page = [(event_id_of(eid), fields[b"e"]) for eid, fields in entries if b"e" in fields]
        frames = page_frames(sub.last_sent, page) if page else b""
        if page:
            sub.last_sent = page[-1][0]
            metrics.delivered_stored(len(page))
        if len(entries) < CATCH_UP_PAGE:  # the last page: the reply read with it is current
            frames += replies.snapshot(sub, reply)
            if frames:
                yield frames
            return
        after = event_id_of(entries[-1][0])  # past skipped entries too: a page of them must not repeat
        if frames:
            yield frames


def followed(hub: Hub | None, cid: str) -> Conversation | None:
    """The hub's state for `cid` if the hub follows it now, confirmed by Redis; else None.

    Every event stored after this moment is announced to the hub: a stream that reads the store
    now, before it registers, misses nothing the hub has not handed out by then (see `gapless`).
    """
    if hub is None or hub.closing:
        return None
    conv = hub.conversations.get(cid)
    return conv if conv is not None and hub.listener.is_subscribed(conv.channel) else None


def gapless(hub: Hub, conv: Conversation, upto: int) -> bool:
    """Whether a stream registered now lacks nothing after `upto`, read while `conv` was `followed`.

    The events after `upto` were stored after the read, so announced to the hub, which hands them
    out in id order: those it handed out before the stream registered are at most `conv.position`
    (which only grows). The same conversation (not one followed anew, whose subscription came
    later) and nothing handed out past `upto`: then every event the stream lacks is still to come
    through the hub.
    """
    return hub.conversations.get(conv.cid) is conv and (conv.position is None or conv.position <= upto)


def live_frames(store: Store, sub: Subscriber) -> bytes:
    """The frames of the subscriber's pending batches (and reply deltas) that it has not sent yet, in order.

    A batch that starts past the next expected id (announcements lost while the hub's pub/sub
    connection was down) is preceded by what Redis still has in between, and by
    `history_truncated` if retention dropped some of it: a gap is never skipped silently.
    """
    out: list[bytes] = []
    for batch in sub.take():
        if type(batch) is Delta:
            out.extend(delta_frames(store, sub, batch))
            continue
        if batch.last_id <= sub.last_sent:
            continue
        if batch.first_id > sub.last_sent + 1:
            out.extend(catch_up(store, sub, upto=batch.first_id - 1))
            if batch.first_id > sub.last_sent + 1:
                out.append(history_truncated(batch.first_id))
                sub.last_sent = batch.first_id - 1
        if batch.first_id == sub.last_sent + 1:
            out.append(batch.joined)
        else:
            out.extend(frame for n, frame in batch.items if n > sub.last_sent)
        sub.last_sent = batch.last_id
    return b"".join(out)


def delta_frames(store: Store, sub: Subscriber, delta: Delta) -> list[bytes]:
    """The frames that put a reply delta at its place: after event L (delta.upto), before anything later.

    A stream that has sent events past L drops it (it may be older than a final agent_message
    the client has; a stream that joined mid-reply got the text so far instead). One that lacks
    events up to L (catching up; an announcement lost or not made yet) reads them first; if they
    are no longer stored, the delta is dropped and the events after L say the gap.
    """
    out = list(catch_up(store, sub, upto=delta.upto)) if sub.last_sent < delta.upto else []
    if sub.last_sent == delta.upto:
        frame = replies.frame_for(sub, delta)
        if frame is not None:
            out.append(frame)
    return out


def wait(sub: Subscriber, timeout: float) -> bool:
    """Wait for the hub or the timeout; False on the timeout. A client gone away ends the stream."""
    woken = sub.wake.wait(timeout=timeout)
    sub.wake.clear()
    if sub.readable:
        sub.readable = False
        if sub.sock is not None and client_gone(sub.sock):
            sub.end("disconnected")
        else:
            sub.watch_socket()  # it only sent bytes (dropped): watch for its departure again
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
        sub.send(data)
        sub.last_write = time.monotonic()
    sub.busy = False


def follow_direct(store: Store, sub: Subscriber, heartbeat: float) -> None:
    """The live part of a stream whose batches the hub writes itself; this greenlet only waits.

    It takes the socket over when a write would block (or a batch needs filtering), for pings,
    and to close: a half-written chunk is always completed, so the framing stays valid. A ping
    goes out only after `heartbeat` seconds with nothing written, by the hub or by this greenlet.
    """
    sub.direct = True
    sub.last_write = time.monotonic()
    while True:
        silent_for = time.monotonic() - sub.last_write
        woken = wait(sub, max(heartbeat - silent_for, 0.0))
        reason = sub.end_reason
        if reason is not None:
            if reason in ("deleted", "shutdown"):
                flush(store, sub)
            elif reason != "disconnected" and sub.outbuf:
                sub.send(sub.outbuf)
            return
        if sub.busy or sub.pending:
            flush(store, sub)
        elif not woken and time.monotonic() - sub.last_write >= heartbeat:
            sub.busy = True
            sub.send(PING_CHUNK)
            sub.last_write = time.monotonic()
            flush(store, sub)


def stored_then_end(store: Store, sub: Subscriber, opening: bytes) -> Iterator[bytes]:
    """The body of a stream that a worker on its way out answers: the opening and what is stored."""
    yield opening
    try:
        yield from catch_up(store, sub)
    except redis.RedisError as err:
        if redis_unavailable(err) is None:
            raise


def stream(hub: Hub, store: Store, sub: Subscriber, opening: bytes, heartbeat: float,
           caught_up: bool = False) -> Iterator[bytes]:
    """The body of an SSE response: opening, stored events, then live ones; pings while idle.

    `caught_up`: the opening holds every stored event the stream lacks (read with the caller's
    checks, and `gapless`), so the store is not read again.
    """
    reason = "closed"  # the server closed the response (gunicorn, after the client went away mid-write)
    metrics.OPEN_STREAMS.inc()
    try:
        hub.started(sub)
        yield from pieces(sub, opening)
        if not caught_up:
            for frames in opening_catch_up(store, sub):
                yield from pieces(sub, frames)
        if sub.fd is not None:
            # What arrived during the catch-up goes out through gunicorn; then the hub writes.
            while sub.pending and sub.end_reason is None:
                yield from pieces(sub, live_frames(store, sub))
            if sub.end_reason is None:
                follow_direct(store, sub, heartbeat)
            return
        while True:
            woken = wait(sub, heartbeat)
            if sub.end_reason is not None:
                # What is already queued still goes out before a deletion/shutdown ends the stream.
                if sub.end_reason in ("deleted", "shutdown"):
                    yield from pieces(sub, live_frames(store, sub))
                return
            data = live_frames(store, sub) if woken else b""
            if data or not woken:
                yield from pieces(sub, data or PING)
    except redis.RedisError as err:
        unavailable = redis_unavailable(err)
        metrics.redis_error(err, "stream")
        if unavailable is None:
            reason = "error"
            raise
        log.info("stream %s ended: Redis unavailable during catch-up (%s)", sub.connection_id, unavailable[0])
        reason = "redis_unavailable"
    except OSError:
        reason = "disconnected"  # the client went away during a write of ours
    except Exception:
        reason = "error"
        raise
    finally:
        hub.unsubscribe(sub)
        metrics.OPEN_STREAMS.dec()
        logs.stream_ended(sub, sub.end_reason or reason)
