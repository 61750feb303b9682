"""Per-worker fan-out: one Redis reader feeds every SSE subscriber of the worker.

A stream never holds a Redis connection. The hub keeps two of its own per worker, whatever the
number of clients: the reader (one ``XREAD BLOCK`` over every conversation that has local
subscribers) and the control connection (``CLIENT UNBLOCK`` when that set changes, and the
once-a-second check that ends streams of deleted conversations and revoked keys). Each entry is
read once and its SSE frame encoded once; every subscriber gets the same bytes.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import gevent
import gevent.event
import gevent.monkey
import redis

from . import sse
from .errors import redis_unavailable
from .redis import make_dedicated_client
from .store import Store, api_key_key, conv_events_key, conv_meta_key, entry_id, event_id_of

log = logging.getLogger(__name__)

READ_BLOCK_MS = 5000
READ_COUNT = 1000
CHECK_INTERVAL = 1.0
OVERFLOW_GRACE = 5.0
COALESCE_MIN_WRITES = 200  # a dispatch this large makes the next read wait to gather more
UNSTARTED_GRACE = 10.0  # a stream registered but not yet iterated this long never will be


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
        "outbuf", "__weakref__",
    )

    def __init__(self, conversation_id: str, user_id: str, key_id: str, connection_id: str, last_sent: int,
                 sock: socket.socket | None = None, chunked: bool = False):
        self.conversation_id = conversation_id
        self.user_id = user_id
        self.key_id = key_id
        self.connection_id = connection_id
        self.last_sent = last_sent
        self.pending: list[Batch] = []
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

    def deliver(self, batch: Batch, limit: int) -> None:
        """Queue a batch; a subscriber that falls `limit` events behind is ended (it resumes by id)."""
        if self.end_reason is not None:
            return
        self.pending.append(batch)
        self.pending_events += len(batch.items)
        if self.pending_events > limit:
            self.pending = []
            self.end("overflow")
            # A client that stopped reading leaves its stream blocked in a write: cut it loose.
            gevent.spawn_later(OVERFLOW_GRACE, self._abort)
        self.wake.set()

    def write_now(self, batch: Batch) -> None:
        """Send the batch straight to the socket; what does not fit goes to the stream's greenlet."""
        data = batch.chunk
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self.end("disconnected")
            return
        self.last_sent = batch.last_id
        if written < len(data):
            self.outbuf = data[written:]
            self.busy = True
            self.wake.set()

    def _abort(self) -> None:
        if not self.done and self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
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
        """Wake the stream as soon as the client's socket turns readable (EOF: it went away)."""
        if self.sock is None:
            return
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


class Conversation:
    """The hub's state for one conversation that has local subscribers."""

    __slots__ = ("cid", "key", "subscribers", "position", "ready", "failed")

    def __init__(self, cid: str):
        self.cid = cid
        self.key = conv_events_key(cid).encode()
        self.subscribers: set[Subscriber] = set()
        self.position: str | None = None  # last stream entry id handed out; None until known
        self.ready = gevent.event.Event()
        self.failed = False


class HubUnavailable(Exception):
    """The hub cannot take subscribers (not under gevent, or the worker is shutting down)."""


class Hub:
    """The fan-out of one worker process."""

    def __init__(self, redis_url: str, store: Store, *, queue_max: int, stream_cap: int, lease_ttl: float = 30.0,
                 coalesce: float = 0.0):
        self.store = store
        self.coalesce = coalesce
        self.queue_max = queue_max
        self.stream_cap = stream_cap
        self.lease_ttl = lease_ttl
        # Registered streams whose response has not started yet, with when they registered: one
        # that never starts (an exception after the view returned) would otherwise hold its slot
        # and subscription forever.
        self.unstarted: dict[Subscriber, float] = {}
        self.conversations: dict[str, Conversation] = {}
        self.by_key: dict[str, set[Subscriber]] = {}
        self.by_user: dict[str, set[Subscriber]] = {}
        self.closing = False
        self.pid = os.getpid()
        self._reader = make_dedicated_client(redis_url, "hub-reader", READ_BLOCK_MS / 1000 + 5)
        self._control = make_dedicated_client(redis_url, "hub-control", 5.0)
        self._reader_client_id: int | None = None
        self._generation = 0
        self._reader_generation = -1
        self._has_work = gevent.event.Event()
        self._wake_needed = gevent.event.Event()
        self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._wake_loop),
                           gevent.spawn(self._check_loop)]

    # Subscribers ---------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """Open streams in this worker."""
        return sum(len(c.subscribers) for c in self.conversations.values())

    def subscribe(self, sub: Subscriber) -> None:
        """Register a stream, then make sure its conversation is read from its current tip.

        Registering before the caller catches up from Redis is what makes the hand-over gapless:
        every entry after the tip reaches the subscriber's queue, every entry up to the caller's
        catch-up comes from Redis, and the overlap is dropped by id.
        """
        if self.closing:
            self.unsubscribe(sub)  # gives its slot back
            raise HubUnavailable("the worker is shutting down")
        self.unstarted[sub] = time.monotonic()
        conv = self.conversations.get(sub.conversation_id)
        first = conv is None
        if conv is None:
            conv = self.conversations[sub.conversation_id] = Conversation(sub.conversation_id)
        conv.subscribers.add(sub)
        self.by_key.setdefault(sub.key_id, set()).add(sub)
        self.by_user.setdefault(sub.user_id, set()).add(sub)
        try:
            if first:
                try:
                    conv.position = entry_id(self.store.tip(conv.cid))
                except BaseException:
                    conv.failed = True
                    raise
                finally:
                    conv.ready.set()
                self._changed()
            elif not conv.ready.wait(timeout=10) or conv.failed:
                raise HubUnavailable("the conversation could not be followed")
        except BaseException:
            self.unsubscribe(sub)
            raise
        sub.watch_socket()

    def started(self, sub: Subscriber) -> None:
        """The stream's response is being sent: from now on it ends through its generator."""
        self.unstarted.pop(sub, None)

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a stream (idempotent)."""
        self.unstarted.pop(sub, None)
        sub.done = True
        sub.close_watcher()
        conv = self.conversations.get(sub.conversation_id)
        if conv is not None:
            conv.subscribers.discard(sub)
            if not conv.subscribers:
                del self.conversations[sub.conversation_id]
        for index, name in ((self.by_key, sub.key_id), (self.by_user, sub.user_id)):
            group = index.get(name)
            if group is not None:
                group.discard(sub)
                if not group:
                    del index[name]
        if self.stream_cap and sub.connection_id:
            sub_id, sub.connection_id = sub.connection_id, ""
            try:
                self.store.release_stream(sub.user_id, sub_id)
            except redis.RedisError:
                pass  # the lease expires by itself

    def shutdown(self) -> None:
        """End every stream (the worker is exiting): clients reconnect to another worker."""
        self.closing = True
        for conv in list(self.conversations.values()):
            for sub in list(conv.subscribers):
                sub.end("shutdown")

    # The reader ----------------------------------------------------------------------------

    def _changed(self) -> None:
        self._generation += 1
        self._has_work.set()
        self._wake_needed.set()

    def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._reader_client_id is None:
                    self._reader_client_id = self._reader.client_id()
                self._reader_generation = self._generation
                reading = {c.key: c for c in self.conversations.values() if c.position is not None}
                if not reading:
                    self._has_work.clear()
                    self._has_work.wait(timeout=READ_BLOCK_MS / 1000)
                    continue
                result = self._reader.xread(
                    {key: conv.position for key, conv in reading.items()}, count=READ_COUNT, block=READ_BLOCK_MS
                )
                backoff = 0.05
            except redis.RedisError as err:
                # Unavailable (down, loading, a replica after failover...) or not: the reader must not
                # die, or streams would get pings and no events. It resumes from its positions.
                if redis_unavailable(err) is None:
                    log.exception("hub reader: Redis error; retrying in %.2fs", backoff)
                else:
                    log.warning("hub reader: Redis unavailable (%s); retrying in %.2fs", type(err).__name__, backoff)
                self._reader_client_id = None
                self._reader.close()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            writes = 0
            for key, entries in result or ():
                conv = reading.get(key)
                if conv is None or self.conversations.get(conv.cid) is not conv or not entries:
                    continue  # the conversation lost its last subscriber while we read
                ids = [event_id_of(eid) for eid, _fields in entries]
                items = [(n, sse.event_frame(n, fields[b"e"])) for n, (_eid, fields) in zip(ids, entries)]
                conv.position = entries[-1][0].decode()
                batch = Batch(items)
                writes += len(conv.subscribers)
                for sub in list(conv.subscribers):
                    if sub.direct and not sub.busy and batch.first_id == sub.last_sent + 1:
                        sub.write_now(batch)
                    else:
                        sub.deliver(batch, self.queue_max)
            if self.coalesce and writes >= COALESCE_MIN_WRITES:
                # Under fan-out, each socket write costs a syscall whatever it carries: waiting a
                # few ms lets the next read bring several events, written once per subscriber.
                gevent.sleep(self.coalesce)

    def _wake_loop(self) -> None:
        # A CLIENT UNBLOCK that lands between two XREADs is lost, so keep unblocking until the
        # reader has rebuilt its key list from the current set.
        while True:
            self._wake_needed.wait()
            self._wake_needed.clear()
            while self._reader_generation != self._generation:
                if self._reader_client_id is not None:
                    try:
                        self._control.client_unblock(self._reader_client_id)
                    except redis.RedisError:
                        gevent.sleep(0.5)
                gevent.sleep(0.005)

    # Deleted conversations, revoked keys, stream leases -------------------------------------

    def _check_loop(self) -> None:
        last_lease_refresh = time.monotonic()
        while True:
            gevent.sleep(CHECK_INTERVAL)
            self._drop_unstarted()
            try:
                self._check_once()
                if self.stream_cap and time.monotonic() - last_lease_refresh >= self.lease_ttl / 3:
                    self._refresh_leases()
                    last_lease_refresh = time.monotonic()
            except redis.RedisError as err:
                if redis_unavailable(err) is None:
                    log.exception("hub check failed")
                # else streams wait; the reader resumes where it was once Redis is back

    def _drop_unstarted(self) -> None:
        deadline = time.monotonic() - UNSTARTED_GRACE
        for sub, registered in list(self.unstarted.items()):
            if registered < deadline:
                log.warning("stream %s never started; dropping it", sub.connection_id or "(uncapped)")
                self.unsubscribe(sub)

    def _check_once(self) -> None:
        cids = list(self.conversations)
        key_ids = list(self.by_key)
        if not cids and not key_ids:
            return
        pipe = self._control.pipeline(transaction=False)
        for cid in cids:
            pipe.exists(conv_meta_key(cid))
        for key_id in key_ids:
            pipe.hmget(api_key_key(key_id), "user_id", "revoked_at")
        answers = pipe.execute()
        for cid, exists in zip(cids, answers):
            conv = self.conversations.get(cid)
            if not exists and conv is not None:
                for sub in list(conv.subscribers):
                    sub.end("deleted")
        for key_id, (user_id, revoked_at) in zip(key_ids, answers[len(cids):]):
            if user_id is None or revoked_at is not None:
                for sub in list(self.by_key.get(key_id, ())):
                    sub.end("revoked")

    def _refresh_leases(self) -> None:
        leases = {user_id: [sub.connection_id for sub in subs if sub.connection_id]
                  for user_id, subs in self.by_user.items()}
        self.store.renew_streams({u: ids for u, ids in leases.items() if ids}, self.lease_ttl, client=self._control)


def gevent_ready() -> bool:
    """Whether sockets are gevent's (blocking Redis reads would otherwise stall the worker)."""
    return gevent.monkey.is_module_patched("socket")
