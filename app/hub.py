"""Per-worker fan-out: announcements in, each event framed once, out to every local subscriber.

A stream never holds a Redis connection. The hub keeps two of its own per worker, whatever the
number of clients and conversations: the pub/sub connection (broker.Listener), on which the
append script announces every event of the conversations followed here, and the control
connection (gap fills, the once-a-second check that ends streams of deleted conversations and
revoked keys, lease renewals). Each event is framed once; every subscriber gets the same bytes.
Following or leaving a conversation is O(1): a channel added to or taken from a set.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.monkey
import redis

from . import metrics, replies, sse
from .broker import Listener, wait_for
from .cluster_listener import ClusterListener
from .errors import redis_unavailable
from .keys import COOKIE_GEN, api_key_key, cookie_generation
from .redis import is_cluster, make_dedicated_client
from .store import (
    DELETED_NOTICE,
    Store,
    conv_channel,
    conv_events_key,
    conv_meta_key,
    entry_id,
)
from .subscriber import Batch, Subscriber, end_stalled, entry_frames

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
# Checks (seconds) between looks at whether followed conversations still exist: a deletion is
# announced at once, and looked for after every pub/sub reconnect; this is the last safety net
# (keys removed by hand), done in pipelines of CHECK_PIPELINE that yield between them.
CONVERSATION_CHECK_EVERY = 30
CHECK_PIPELINE = 1000
COALESCE_MIN_WRITES = 200  # a dispatch this large makes the next one wait to gather more
UNSTARTED_GRACE = 10.0  # a stream registered but not yet iterated this long never will be
FOLLOW_TIMEOUT = 10.0
RESYNC_PAGE = 1000
RESYNC_PIPELINE = 200


class Conversation:
    """The hub's state for one conversation that has local subscribers."""

    __slots__ = ("cid", "channel", "subscribers", "position", "subscribed", "deltas")

    def __init__(self, cid: str):
        self.cid = cid
        self.channel = conv_channel(cid).encode()
        self.subscribers: set[Subscriber] = set()
        self.position: int | None = None  # last event id handed out; None until the first one
        self.subscribed = gevent.event.Event()  # set each time Redis confirms the subscription
        self.deltas = 0  # reply deltas handed out (a stream that read the reply before it registered checks it)


class HubUnavailable(Exception):
    """The hub cannot take subscribers (not under gevent, or the worker is shutting down)."""


def event_id_in(data: bytes) -> int | None:
    """The id at the head of an announced event (`{"id":N,...`), None if it is not one."""
    if not data.startswith(b'{"id":'):
        return None
    end = data.find(b",", 6)
    digits = data[6:end] if 6 < end <= 25 else b""  # ids fit in 19 digits; int() refuses thousands
    return int(digits) if digits.isascii() and digits.isdigit() else None


class Hub:
    """The fan-out of one worker process."""

    def __init__(self, redis_url: str, store: Store, *, queue_max: int, stream_cap: int, lease_ttl: float = 30.0,
                 coalesce: float = 0.0, stall_seconds: float = 60.0):
        # First, as it may fail (Redis down: the caller answers 503 and the next stream tries again).
        sharded = store.publish == "SPUBLISH"
        self.store = store
        self.coalesce = coalesce
        self.queue_max = queue_max
        self.stream_cap = stream_cap
        self.lease_ttl = lease_ttl
        self.stall_seconds = stall_seconds  # a write waiting this long on its client ends its stream; 0: never
        # Registered streams whose response has not started yet, with when they registered: one
        # that never starts (an exception after the view returned) would otherwise hold its slot
        # and subscription forever.
        self.unstarted: dict[Subscriber, float] = {}
        self.conversations: dict[str, Conversation] = {}
        self.by_channel: dict[bytes, Conversation] = {}
        self.by_key: dict[str, set[Subscriber]] = {}
        self.by_user: dict[str, set[Subscriber]] = {}
        self.closing = False
        self.pid = os.getpid()
        self._control = make_dedicated_client(redis_url, "hub-control", 5.0)
        self._resync = gevent.event.Event()
        callbacks = dict(on_messages=self._on_messages, on_subscribed=self._on_subscribed,
                         on_reconnected=self._resync.set)
        self.listener: Listener | ClusterListener = (
            ClusterListener(redis_url, make_dedicated_client(redis_url, "hub-topology", 5.0), sharded=sharded,
                            **callbacks)
            if is_cluster(self._control) else Listener(redis_url, **callbacks))
        self._greenlets = [self._forever("check", self._check_loop), self._forever("resync", self._resync_loop)]

    @staticmethod
    def _forever(name: str, loop: Callable[[], None]) -> gevent.Greenlet:
        def run() -> None:
            backoff = 0.05
            while True:
                try:
                    loop()
                except Exception:  # noqa: BLE001 - a dead loop would leave streams without events
                    log.exception("hub %s loop failed; restarting in %.2fs", name, backoff)
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        return gevent.spawn(run)

    # Subscribers ---------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """Open streams in this worker."""
        return sum(len(c.subscribers) for c in self.conversations.values())

    def running(self) -> bool:
        """Whether the hub's loops all run (its own and its listener's); Redis down or not.

        Each loop restarts itself after an exception; one that is dead (killed, or ended by a
        BaseException) never comes back, and this worker's streams would never get events again.
        """
        return self.listener.alive() and not any(g.dead for g in self._greenlets)

    def reading(self) -> bool:
        """Whether the hub receives announcements: its loops run and its pub/sub connection is up."""
        return self.running() and self.listener.serving

    def subscribe(self, sub: Subscriber) -> None:
        """Register a stream, and return once its conversation's announcements reach this hub.

        Registering before the caller catches up from Redis is what makes the hand-over gapless:
        every event written after the subscription is confirmed reaches the subscriber's queue,
        every event before comes from the caller's catch-up, and the overlap is dropped by id.
        """
        if self.closing:
            self.unsubscribe(sub)  # gives its slot back
            raise HubUnavailable("the worker is shutting down")
        self.unstarted[sub] = time.monotonic()
        conv = self.conversations.get(sub.conversation_id)
        if conv is None:
            conv = self.conversations[sub.conversation_id] = Conversation(sub.conversation_id)
            self.by_channel[conv.channel] = conv
            self.listener.follow(conv.channel)
        conv.subscribers.add(sub)
        self.by_key.setdefault(sub.key_id, set()).add(sub)
        self.by_user.setdefault(sub.user_id, set()).add(sub)
        try:
            if not wait_for(lambda: self.listener.is_subscribed(conv.channel), conv.subscribed, FOLLOW_TIMEOUT):
                raise HubUnavailable("the conversation could not be followed (Redis pub/sub)")
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
                del self.by_channel[conv.channel]
                self.listener.leave(conv.channel)
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

    # Announcements -------------------------------------------------------------------------

    def _on_subscribed(self, channel: bytes) -> None:
        conv = self.by_channel.get(channel)
        if conv is not None:
            conv.subscribed.set()

    def _on_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        # Grouped per conversation, in the order Redis published them (its ids' order); reply deltas
        # keep their place among the events (`mixed`).
        grouped: dict[Conversation, list] = {}
        mixed: set[Conversation] = set()
        deleted: list[Conversation] = []
        last_event = b""
        for channel, data in messages:
            conv = self.by_channel.get(channel)
            if conv is None:
                continue  # left meanwhile
            event_id = event_id_in(data)
            if event_id is not None:
                grouped.setdefault(conv, []).append((event_id, sse.event_frame(event_id, data)))
                last_event = data
            elif data[:1] == replies.DELTA_MARK:
                delta = replies.parse_delta(data)  # once here, whatever the number of streams
                if delta is not None:
                    grouped.setdefault(conv, []).append(delta)
                    mixed.add(conv)
            elif data[:1] == b"#" and 1 < len(data) <= 20 and data[1:].isascii() and data[1:].isdigit():
                # A doorbell: event N is stored (announced again after a retry); read what is new.
                grouped.setdefault(conv, []).extend(self._up_to(conv, int(data[1:])))
            elif data == DELETED_NOTICE:
                deleted.append(conv)
            else:
                log.warning("hub: ignored a malformed announcement on %s", channel[:80])
        writes = delivered = 0
        for conv, items in grouped.items():
            for run in replies.runs(items) if conv in mixed else (items,):  # each run of events as one batch
                if isinstance(run, replies.Delta):
                    writes += self._dispatch_delta(conv, run)
                else:
                    reached, events = self._dispatch(conv, run)
                    writes += reached
                    delivered += reached * events
        # Once per read, whatever the number of streams and events (see app/metrics.py).
        metrics.delivered_live(delivered)
        if last_event:
            metrics.observe_read_lag(last_event)
        for conv in deleted:  # after the events announced before it: those still go out
            for sub in list(conv.subscribers):
                sub.end("deleted")
        if self.coalesce and writes >= COALESCE_MIN_WRITES:
            # Under fan-out, each socket write costs a syscall whatever it carries: waiting a few
            # ms lets the next batch bring several events, written once per subscriber.
            gevent.sleep(self.coalesce)

    def _dispatch_delta(self, conv: Conversation, delta: replies.Delta) -> int:
        """Hand a reply delta to the conversation's subscribers; the number of subscribers reached."""
        if self.conversations.get(conv.cid) is not conv:
            return 0
        conv.deltas += 1
        replies.hand_out(conv.subscribers, delta, self.queue_max)
        return len(conv.subscribers)

    def _dispatch(self, conv: Conversation, items: list[tuple[int, bytes]]) -> tuple[int, int]:
        """Hand events to the conversation's subscribers; (subscribers reached, events handed to each)."""
        if conv.position is not None:
            items = [item for item in items if item[0] > conv.position]
            if items and items[0][0] > conv.position + 1:
                items = self._fill(conv, items[0][0]) + items
        if not items or self.conversations.get(conv.cid) is not conv:
            return 0, 0
        conv.position = items[-1][0]
        batch = Batch(items)
        for sub in list(conv.subscribers):
            # Nothing queued: a batch must not overtake a reply delta waiting for the stream's greenlet.
            if sub.direct and not sub.busy and not sub.pending and batch.first_id == sub.last_sent + 1:
                sub.write_now(batch)
            else:
                sub.deliver(batch, self.queue_max)
        return len(conv.subscribers), len(items)

    def _fill(self, conv: Conversation, before: int) -> list[tuple[int, bytes]]:
        """The stored events between the conversation's position and `before` (announcements missed)."""
        try:
            # At most a page: past it, each subscriber reads the rest of the gap itself.
            entries = self._control.xrange(conv_events_key(conv.cid), min=entry_id(conv.position + 1),
                                           max=entry_id(before - 1), count=min(before - conv.position, RESYNC_PAGE))
        except redis.RedisError as err:
            metrics.redis_error(err, "hub")
            return []  # the subscribers close the gap from Redis themselves
        return entry_frames(entries)

    def _up_to(self, conv: Conversation, last: int) -> list[tuple[int, bytes]]:
        """The stored events up to `last` that the conversation's subscribers may lack."""
        if conv.position is not None and last <= conv.position:
            return []
        after = conv.position if conv.position is not None else min((s.last_sent for s in conv.subscribers),
                                                                      default=last - 1)
        try:
            entries = self._control.xrange(conv_events_key(conv.cid), min=entry_id(after + 1), max=entry_id(last),
                                           count=min(last - after, RESYNC_PAGE))
        except redis.RedisError as err:
            metrics.redis_error(err, "hub")
            return []  # the next announcement, or the subscribers themselves, close the gap
        return entry_frames(entries)

    def _resync_loop(self) -> None:
        # After a pub/sub reconnect, announcements made while it was down are lost: once a
        # conversation's channel is subscribed again, read them from its stream (the truth). Retried
        # until it succeeds (Redis may still be loading): a quiet conversation has no later event to
        # reveal the gap. On a Cluster, conversations whose master is back are read without waiting
        # for those whose master is still down.
        self._resync.wait()
        self._resync.clear()
        backoff = 0.05
        pending = {id(c): c for c in self.conversations.values() if c.subscribers}
        while True:
            pending = {k: c for k, c in pending.items() if c.subscribers and self.conversations.get(c.cid) is c}
            ready = [c for c in pending.values() if self.listener.is_subscribed(c.channel)]
            if not ready and pending:
                gevent.sleep(0.05)
                continue
            try:
                self._resync_once(ready)
                for conv in ready:
                    pending.pop(id(conv), None)
                if not pending:
                    self._check_once(conversations=True)
                    return
            except redis.RedisError as err:
                metrics.redis_error(err, "hub")
                log.warning("hub: reading what pub/sub missed failed (%s); again in %.2fs", type(err).__name__,
                            backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _resync_once(self, convs: list[Conversation]) -> None:
        for start in range(0, len(convs), RESYNC_PIPELINE):
            chunk = [c for c in convs[start:start + RESYNC_PIPELINE] if c.subscribers]
            if not chunk:
                continue
            pipe = self._control.pipeline(transaction=False)
            for conv in chunk:
                after = conv.position if conv.position is not None else min(s.last_sent for s in conv.subscribers)
                pipe.xrange(conv_events_key(conv.cid), min=entry_id(after + 1), max="+", count=RESYNC_PAGE)
            for conv, entries in zip(chunk, pipe.execute()):
                items = entry_frames(entries)
                if items and conv.subscribers:
                    reached, events = self._dispatch(conv, items)
                    metrics.delivered_live(reached * events)

    # Deleted conversations, revoked keys, stream leases -------------------------------------

    def _check_loop(self) -> None:
        last_lease_refresh = time.monotonic()
        checks = 0
        while True:
            gevent.sleep(CHECK_INTERVAL)
            checks += 1
            self._drop_unstarted()
            if self.stall_seconds:  # a stuck write makes no event come, no ping go: only this check sees it
                end_stalled([s for c in self.conversations.values() for s in c.subscribers], self.stall_seconds)
            try:
                self._check_once(conversations=checks % CONVERSATION_CHECK_EVERY == 0)
                if self.stream_cap and time.monotonic() - last_lease_refresh >= self.lease_ttl / 3:
                    self._refresh_leases()
                    last_lease_refresh = time.monotonic()
            except redis.RedisError as err:
                metrics.redis_error(err, "hub")
                if redis_unavailable(err) is None:
                    log.exception("hub check failed")
                # else streams wait; the hub resumes once Redis is back

    def _drop_unstarted(self) -> None:
        deadline = time.monotonic() - UNSTARTED_GRACE
        for sub, registered in list(self.unstarted.items()):
            if registered < deadline:
                log.warning("stream %s never started; dropping it", sub.connection_id or "(uncapped)")
                self.unsubscribe(sub)

    def _check_once(self, conversations: bool) -> None:
        key_ids = list(self.by_key)
        if key_ids:
            pipe = self._control.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hmget(api_key_key(key_id), "user_id", "revoked_at", COOKIE_GEN)
            for key_id, (user_id, revoked_at, gen) in zip(key_ids, pipe.execute()):
                revoked = user_id is None or revoked_at is not None
                # A sign-out (a new cookie generation) ends the cookie streams of an older one (their
                # key id is an auth.CookieKeyId); the key's Bearer streams (a plain str) have none.
                current = cookie_generation(gen)
                for sub in list(self.by_key.get(key_id, ())):
                    if revoked or getattr(sub.key_id, "cookie_gen", current) != current:
                        sub.end("revoked")
        cids = list(self.conversations) if conversations else []
        for start in range(0, len(cids), CHECK_PIPELINE):
            chunk = cids[start:start + CHECK_PIPELINE]
            pipe = self._control.pipeline(transaction=False)
            for cid in chunk:
                pipe.exists(conv_meta_key(cid))
            for cid, exists in zip(chunk, pipe.execute()):
                conv = self.conversations.get(cid)
                if not exists and conv is not None:
                    for sub in list(conv.subscribers):
                        sub.end("deleted")
            gevent.sleep(0)  # thousands of conversations: let the announcements through meanwhile

    def _refresh_leases(self) -> None:
        leases = {user_id: [sub.connection_id for sub in subs if sub.connection_id]
                  for user_id, subs in self.by_user.items()}
        self.store.renew_streams({u: ids for u, ids in leases.items() if ids}, self.lease_ttl, client=self._control)


def gevent_ready() -> bool:
    """Whether sockets are gevent's (blocking Redis reads would otherwise stall the worker)."""
    return gevent.monkey.is_module_patched("socket")
