"""One open stream as the hub sees it, and the batches of frames (and reply deltas) it hands to streams."""
from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from . import metrics, sse
from .keys import event_id_of

if TYPE_CHECKING:
    from .replies import Delta

OVERFLOW_GRACE = 5.0  # after an overflow, a stream still blocked in a write this long is cut off
TCP_INFO_SIZE = 136
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, dropping what is queued
TCP_INFO_BYTES_ACKED = struct.Struct("=Q")  # tcpi_bytes_acked, at offset 120 of struct tcp_info (Linux 4.1+)


class Batch:
    """Events read together for one conversation: their frames, and all of them joined once."""

    __slots__ = ("first_id", "last_id", "items", "joined", "chunk")

    def __init__(self, items: list[tuple[int, bytes]]):
        self.items = items
        self.first_id = items[0][0]
        self.last_id = items[-1][0]
        self.joined = b"".join(frame for _n, frame in items)
        self.chunk = sse.http_chunk(self.joined)


class Subscriber:
    """One open stream: where it is, what is queued for it, and why it must end."""

    __slots__ = (
        "conversation_id", "user_id", "key_id", "connection_id", "last_sent", "pending",
        "pending_events", "wake", "end_reason", "readable", "sock", "watcher", "done", "fd", "direct", "busy",
        "outbuf", "last_write", "reply_cause", "reply_chars", "reply_at", "request_id", "opened", "first_id",
        "stalled_since", "acked", "acked_at", "__weakref__",
    )

    def __init__(self, conversation_id: str, user_id: str, key_id: str, connection_id: str, last_sent: int,
                 sock: socket.socket | None = None, chunked: bool = False):
        self.conversation_id = conversation_id
        self.user_id = user_id
        self.key_id = key_id
        self.connection_id = connection_id
        self.last_sent = last_sent
        self.pending: list[Batch | Delta] = []  # in the order the hub got them (deltas among the batches)
        self.pending_events = 0
        self.wake = gevent.event.Event()
        self.end_reason: str | None = None
        self.readable = False
        self.sock = sock
        self.watcher: Any = None
        self.done = False
        # Direct writes: once a stream is live, the hub writes each batch to its socket itself
        # (one non-blocking write, no greenlet switch). `fd` is set only where that is possible:
        # a plain socket whose response gunicorn sends with chunked transfer encoding.
        self.fd = sock.fileno() if sock is not None and chunked else None
        self.direct = False
        self.busy = False  # the stream's greenlet owns the socket (a write would block)
        self.outbuf = b""  # the unwritten rest of a direct write; the greenlet sends it
        self.last_write = 0.0  # monotonic time of the last write to the socket (pings wait for silence)
        # Monotonic time since which a write has waited on the client with no byte taken; 0: none waits.
        # Stamped by whoever writes (the generator around each piece gunicorn sends, the greenlet per
        # send, the hub when a direct write is left half done); the hub's check ends a stream stuck too long.
        self.stalled_since = 0.0
        # The client's progress inside a wait, as the hub's check last saw it (TCP's bytes acked, and when they grew).
        self.acked: int | None = None
        self.acked_at = 0.0
        # The reply (live deltas) it shows: its cause, the characters sent, and last_sent then (replies.py).
        self.reply_cause: int | None = None
        self.reply_chars = 0
        self.reply_at = -2
        # For the stream's end (its log line): the request it answers, when it opened, where it began.
        self.request_id = ""
        self.opened = time.monotonic()
        self.first_id = last_sent

    def deliver(self, batch: Batch, limit: int) -> None:
        """Queue a batch; a subscriber that falls `limit` events behind is ended (it resumes by id)."""
        if self.end_reason is not None:
            return
        self.pending.append(batch)
        # Only what it does not have yet counts (a re-read batch may overlap what it sent).
        self.pending_events += max(0, batch.last_id - max(self.last_sent, batch.first_id - 1))
        if self.pending_events > limit:
            self._overflow()
        self.wake.set()

    def deliver_delta(self, delta: Delta, limit: int) -> None:
        """Queue a reply delta in order with the batches; it counts as one event towards `limit`."""
        if self.end_reason is not None:
            return
        self.pending.append(delta)
        self.pending_events += 1
        if self.pending_events > limit:
            self._overflow()
        self.wake.set()

    def _overflow(self) -> None:
        metrics.SUBSCRIBER_OVERFLOWS.inc()  # rare: at most once per stream
        self.pending = []
        self.end("overflow")
        # A client that stopped reading leaves its stream blocked in a write: cut it loose.
        gevent.spawn_later(OVERFLOW_GRACE, self._abort)

    def write_now(self, batch: Batch) -> None:
        """Send the batch straight to the socket; what does not fit goes to the stream's greenlet."""
        if self.write_chunk(batch.chunk):
            self.last_sent = batch.last_id

    def write_chunk(self, data: bytes) -> bool:
        """Send an HTTP chunk straight to the socket; False if the client is gone.

        What does not fit (a write that would block) is left in `outbuf` for the stream's greenlet,
        which then owns the socket (`busy`) until it has sent it.
        """
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self.end("disconnected")
            return False
        self.last_write = time.monotonic()
        if written < len(data):
            self.stalled_since = self.last_write  # the stream's greenlet sends the rest, stamping as it goes
            self.outbuf = data[written:]
            self.busy = True
            self.wake.set()
        return True

    def send(self, data: bytes) -> None:
        """Send all of `data` from the stream's greenlet, stamping `stalled_since` anew whenever bytes go out."""
        view = memoryview(data)
        while view:
            self.stalled_since = time.monotonic()
            view = view[self.sock.send(view):]  # waits until the socket takes some bytes
        self.stalled_since = 0.0

    def _abort(self) -> None:
        if not self.done and self.sock is not None:
            # The OS socket's shutdown, not gevent's: gevent's cancels the blocked write with EBADF
            # ("closed in another greenlet"), which gunicorn logs as an error with a traceback when
            # the write is its own (a catch-up going out through it); the kernel's makes that write
            # fail with EPIPE, which gunicorn takes quietly for the client going away it is.
            raw = getattr(self.sock, "_sock", self.sock)
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def take(self) -> list[Batch]:
        """Everything queued, emptying the queue."""
        batches, self.pending, self.pending_events = self.pending, [], 0
        return batches

    def end(self, reason: str) -> None:
        """Ask the stream to end (the first reason wins)."""
        if self.end_reason is None:
            self.end_reason = reason
        self.wake.set()

    def watch_socket(self) -> None:
        """Wake the stream as soon as the client's socket turns readable (EOF: it went away); again after a wake."""
        if self.sock is None or self.done:
            return
        if self.watcher is None:
            self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self.watcher.start(self._on_readable)

    def _on_readable(self) -> None:
        # Level-triggered: stop at once, the stream greenlet peeks to tell EOF from data.
        self.watcher.stop()
        self.readable = True
        self.wake.set()

    def close_watcher(self) -> None:
        """Release the socket watcher."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None


def bytes_acked(sock: socket.socket | None) -> int | None:
    """The bytes the client's TCP has acknowledged on `sock` (Linux's TCP_INFO), None if not a TCP socket."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except (OSError, AttributeError):  # a Unix socket (behind a proxy), or none
        return None
    return TCP_INFO_BYTES_ACKED.unpack_from(info, 120)[0] if len(info) >= 128 else None


def end_stalled(subscribers: Iterable[Subscriber], limit: float) -> int:
    """End (and cut off) every stream whose write has waited `limit` seconds on a client taking nothing; how many.

    Whole writes are what the writers see (a piece gunicorn sends, a send once the socket has room
    again: a third of a send buffer of up to MBs): a slow client may take longer than `limit` for
    one. So a wait past half the limit is looked at once a check, one getsockopt: a TCP client whose
    acknowledged bytes grew within the last half limit is slow, not stalled.
    """
    now = time.monotonic()
    ended = 0
    for sub in subscribers:
        since = sub.stalled_since
        if not since or now - since < limit / 2 or sub.done:
            continue
        acked = bytes_acked(sub.sock)
        if acked is not None and acked != sub.acked:
            sub.acked, sub.acked_at = acked, now
        if now - since >= limit and (acked is None or now - sub.acked_at >= limit / 2):
            sub.end("stalled")  # the first reason wins: one ending already (overflow, deleted) keeps its own
            # A reset, not a FIN after what is queued: a client taking nothing would leave the
            # kernel holding those bytes, probing its shut window, for minutes after the close.
            raw = getattr(sub.sock, "_sock", sub.sock)
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except (OSError, AttributeError):
                pass
            sub._abort()  # the blocked write fails (EPIPE): the stream ends through its usual path
            sub.stalled_since = 0.0
            ended += 1
    return ended


def entry_frames(entries: list) -> list[tuple[int, bytes]]:
    """(id, frame) of stored stream entries (XRANGE's); an entry not written by us is skipped, not fatal."""
    items = []
    for eid, fields in entries:
        data = fields.get(b"e")
        if data is not None:
            event_id = event_id_of(eid)
            items.append((event_id, sse.event_frame(event_id, data)))
    return items
