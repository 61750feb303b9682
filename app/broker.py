"""The hub's Redis side: announcements of new events, on one pub/sub connection per worker.

The append script stores an event and publishes it on its conversation's channel in the same
step, so the hub learns of each event as it is written, whatever the number of conversations
it follows: following or leaving one is a channel added to or removed from a set, sent to Redis
in batches (one `SUBSCRIBE`/`UNSUBSCRIBE` for all the changes gathered meanwhile). Pub/sub is
at most once; the stream is the truth: after a reconnect the hub re-subscribes everything and
reads from the streams what it may have missed.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import redis

from . import metrics
from .redis import connect_once

log = logging.getLogger(__name__)

SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE/UNSUBSCRIBE command
MAX_BATCH = 1000  # messages handed on at once (then the read loop yields)
PING_INTERVAL = 10.0  # an idle pub/sub connection is checked this often...
READ_TIMEOUT = 3 * PING_INTERVAL  # ...and given up after this long without a byte
MESSAGE_KINDS = (b"message", b"smessage")
SUBSCRIBE_KINDS = (b"subscribe", b"ssubscribe")
UNSUBSCRIBE_KINDS = (b"unsubscribe", b"sunsubscribe")


class Listener:
    """One pub/sub connection that follows the channels it is asked to, and hands on what they carry."""

    def __init__(
        self,
        redis_url: str,
        *,
        on_messages: Callable[[list[tuple[bytes, bytes]]], None],
        on_subscribed: Callable[[bytes], None],
        on_reconnected: Callable[[], None],
        sharded: bool = False,
        address: tuple[str, int] | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        self.url = redis_url
        self.address = address  # the node, on a Cluster
        self.on_messages = on_messages
        self.on_subscribed = on_subscribed
        self.on_reconnected = on_reconnected
        # The connection lost or refused, or a channel Redis will not serve here (a Cluster slot
        # that moved): on a Cluster the caller reads the slot map again and re-routes.
        self.on_lost = on_lost or (lambda: None)
        self.sharded = sharded
        self.commands = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        self.wanted: set[bytes] = set()  # the channels the hub follows
        self.sent: set[bytes] = set()  # those whose SUBSCRIBE went out on this connection
        self.unconfirmed: dict[bytes, int] = {}  # confirmations still to come, per channel
        self.connected = False
        self.connections = 0  # how many times it connected (the first is not a reconnect)
        self.generation = 0  # which connection the sets above describe
        self._conn: Any = None
        self._changed = gevent.event.Event()
        self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._write_loop)]

    @property
    def confirmed(self) -> bool:
        """Whether every wanted channel is subscribed on a live connection."""
        return self.connected and self.sent == self.wanted and not self.unconfirmed

    @property
    def serving(self) -> bool:
        """Whether announcements can reach this worker now (its connection is up)."""
        return self.connected

    def alive(self) -> bool:
        """Whether both loops run."""
        return not any(g.dead for g in self._greenlets)

    def follow(self, channel: bytes) -> None:
        """Start receiving `channel`'s messages (on_subscribed says when)."""
        self.wanted.add(channel)
        self._changed.set()

    def leave(self, channel: bytes) -> None:
        """Stop receiving `channel`'s messages."""
        self.wanted.discard(channel)
        self._changed.set()

    def is_subscribed(self, channel: bytes) -> bool:
        """Whether `channel` is subscribed now, confirmed by Redis."""
        return self.connected and channel in self.sent and channel not in self.unconfirmed

    def stop(self) -> None:
        """Stop both loops and close the connection (a Cluster node this listener no longer serves)."""
        gevent.killall(self._greenlets)
        self.connected = False

    def _connect(self) -> Any:
        return connect_once(self.url, "hub-pubsub", READ_TIMEOUT, self.address)

    def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            try:
                conn = self._connect()
            except Exception as err:  # noqa: BLE001 - whatever it is, retry later
                if isinstance(err, redis.RedisError):
                    metrics.redis_error(err, "pubsub")
                log.warning("hub pub/sub: cannot connect (%s); retrying in %.2fs", type(err).__name__, backoff)
                self.on_lost()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            # A new generation: what the write loop did for the old connection no longer counts.
            self.generation += 1
            self._conn, self.sent, self.unconfirmed, self.connected = conn, set(), {}, True
            self.connections += 1
            backoff = 0.05
            self._changed.set()
            if self.connections > 1:
                self.on_reconnected()
            try:
                self._read(conn)
            except Exception as err:  # noqa: BLE001 - the loop must survive anything
                self.connected = False
                if isinstance(err, redis.exceptions.MovedError | redis.exceptions.AskError):
                    # SSUBSCRIBE to a node that no longer owns the slot: start afresh once re-routed.
                    log.info("hub pub/sub: a channel's slot moved (%s); re-routing", err)
                elif isinstance(err, redis.RedisError):
                    metrics.redis_error(err, "pubsub")
                    log.warning("hub pub/sub: connection lost (%s); reconnecting", type(err).__name__)
                else:
                    log.exception("hub pub/sub: unexpected error; reconnecting")
                self.on_lost()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.connected = False
                self._conn = None
                conn.disconnect()

    def _read(self, conn: Any) -> None:
        while True:
            batch: list[tuple[bytes, bytes]] = []
            reply = conn.read_response()
            for _ in range(MAX_BATCH):
                self._take(reply, batch)
                # What is already buffered goes out as one batch: under load one write per
                # subscriber then carries several events.
                if not conn.can_read(timeout=0):
                    break
                reply = conn.read_response()
            else:
                self._take(reply, batch)
            if batch:
                self.on_messages(batch)
            gevent.sleep(0)  # a long backlog must not starve the worker's other greenlets

    def _take(self, reply: Any, batch: list[tuple[bytes, bytes]]) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a PONG, or nothing we asked for
        kind, channel = reply[0], reply[1]
        if kind in MESSAGE_KINDS:
            batch.append((channel, reply[2]))
        elif kind in SUBSCRIBE_KINDS or kind in UNSUBSCRIBE_KINDS:
            left = self.unconfirmed.get(channel, 0) - 1
            if left > 0:
                self.unconfirmed[channel] = left
                return
            if channel not in self.unconfirmed and kind in UNSUBSCRIBE_KINDS and channel in self.sent:
                # Asked by no one: Redis dropped it (its Cluster slot moved). Subscribed again where it lives now.
                self.sent.discard(channel)
                self._changed.set()
                self.on_lost()
                return
            self.unconfirmed.pop(channel, None)
            if channel in self.sent:
                self.on_subscribed(channel)

    def _write_loop(self) -> None:
        while True:
            try:
                changed = self._changed.wait(timeout=PING_INTERVAL)
                self._changed.clear()
                generation, conn = self.generation, self._conn
                if conn is None or not self.connected:
                    continue
                if not changed:
                    conn.send_command("PING", check_health=False)
                    continue
                subscribe, unsubscribe = self.commands
                # One channel at a time is taken from the sets just before it is sent, so that a
                # send that yields never leaves the sets saying more than went out.
                while self._send_one(generation, conn, unsubscribe, self.sent - self.wanted) \
                        or self._send_one(generation, conn, subscribe, self.wanted - self.sent):
                    pass
            except Exception as err:  # noqa: BLE001 - the read loop reconnects; this one carries on
                log.warning("hub pub/sub: write failed (%s)", type(err).__name__)
                gevent.sleep(0.1)

    def _send_one(self, generation: int, conn: Any, command: bytes, channels: set[bytes]) -> bool:
        """Send `command` for up to SUBSCRIBE_BATCH of `channels` on the current connection; whether it did."""
        if not channels or generation != self.generation or not self.connected:
            return False
        chunk = list(itertools.islice(channels, SUBSCRIBE_BATCH))
        if command.endswith(b"UNSUBSCRIBE"):
            self.sent.difference_update(chunk)
        else:
            self.sent.update(chunk)
        for channel in chunk:
            self.unconfirmed[channel] = self.unconfirmed.get(channel, 0) + 1
        if self.sharded:  # every channel of one SSUBSCRIBE must share a slot: one command each, one write
            conn.send_packed_command(conn.pack_commands([(command, channel) for channel in chunk]), check_health=False)
        else:
            conn.send_command(command, *chunk, check_health=False)
        return True


def wait_for(check: Callable[[], bool], event: gevent.event.Event, timeout: float) -> bool:
    """Wait on `event` until `check()` holds or `timeout` passes; whether it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        event.clear()
        event.wait(timeout=min(remaining, 0.5))
    return True
