"""The hub's announcements on a Redis Cluster: one pub/sub connection per master, channels routed by slot.

On Redis 7 the append script announces with SPUBLISH, which reaches only the master (and
replicas) of the channel's slot, so each channel is followed with SSUBSCRIBE on that master:
one Listener per master, whatever the number of channels. On 6.2 there is no sharded pub/sub:
PUBLISH is broadcast over the cluster bus to every node, so one Listener on any master hears
every channel. A master that dies, or a slot that moves, is noticed (a lost connection, a
MOVED reply, a `sunsubscribe` nobody asked for); the slot map is read again and each channel
followed where it lives now, and the hub reads from the streams what it may have missed.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from .broker import Listener
from .redis import LazyCluster

log = logging.getLogger(__name__)

REFRESH_EVERY = 10.0  # the slot map is read this often anyway (a failover elsewhere, a resharding)
REFRESH_WHILE_DOWN = 1.0  # ...and this often while a master's connection is down
REFRESH_GAP = 0.25  # never more often than this, however often listeners say they lost their node


class ClusterListener:
    """Listeners on the masters of a Cluster, presenting the one-connection Listener's interface."""

    def __init__(
        self,
        redis_url: str,
        topology: LazyCluster,
        *,
        on_messages: Callable[[list[tuple[bytes, bytes]]], None],
        on_subscribed: Callable[[bytes], None],
        on_reconnected: Callable[[], None],
        sharded: bool,
    ):
        self.url = redis_url
        self.topology = topology  # a cluster client of its own: its slot map is read anew at will
        self.sharded = sharded
        self._callbacks = dict(on_messages=on_messages, on_subscribed=on_subscribed)
        self.on_reconnected = on_reconnected
        self.shards: dict[str, Listener] = {}  # node name -> its listener
        self.route: dict[bytes, str] = {}  # channel -> the node name it is followed on
        self.wanted: set[bytes] = set()
        self.moves = 0  # channels re-routed to another master (a failover, a slot that moved)
        self._refresh = gevent.event.Event()
        self._greenlet = gevent.spawn(self._refresh_loop)

    # The Listener interface ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection to every master is up (none known yet: not connected)."""
        return bool(self.shards) and all(shard.connected for shard in self.shards.values())

    @property
    def serving(self) -> bool:
        """Whether announcements reach this worker from some master (one that is down holds back only its own)."""
        return any(shard.connected for shard in self.shards.values())

    @property
    def confirmed(self) -> bool:
        """Whether every wanted channel is subscribed, on the master that owns it."""
        return self.connected and self.wanted == set(self.route) and all(
            self.is_subscribed(channel) for channel in self.wanted)

    @property
    def connections(self) -> int:
        """Pub/sub connections made so far, over every master."""
        return sum(shard.connections for shard in self.shards.values())

    def alive(self) -> bool:
        """Whether the refresh loop and every master's loops run."""
        return not self._greenlet.dead and all(shard.alive() for shard in self.shards.values())

    def follow(self, channel: bytes) -> None:
        """Start receiving `channel`'s messages, on its master (on_subscribed says when)."""
        self.wanted.add(channel)
        node = self._owner(channel)
        if node is None:
            self._refresh.set()  # routed once the slot map is known
            return
        self.route[channel] = node
        self.shards[node].follow(channel)

    def leave(self, channel: bytes) -> None:
        """Stop receiving `channel`'s messages."""
        self.wanted.discard(channel)
        node = self.route.pop(channel, None)
        if node is not None and node in self.shards:
            self.shards[node].leave(channel)

    def is_subscribed(self, channel: bytes) -> bool:
        """Whether `channel` is subscribed now on its master, confirmed by Redis."""
        node = self.route.get(channel)
        return node is not None and node in self.shards and self.shards[node].is_subscribed(channel)

    def stop(self) -> None:
        """Stop every loop and close every connection."""
        self._greenlet.kill()
        for shard in self.shards.values():
            shard.stop()

    # Routing ------------------------------------------------------------------------------

    def _owner(self, channel: bytes) -> str | None:
        """The node a channel is followed on now: its slot's master (sharded), else one master for all."""
        if not self.shards:
            return None
        if not self.sharded:
            return next(iter(self.shards))
        try:
            name = self.topology.get_node_from_key(channel).name
        except Exception:  # noqa: BLE001 - no slot map yet: routed at the next refresh
            return None
        return name if name in self.shards else None

    def _refresh_loop(self) -> None:
        while True:
            try:
                self._refresh_once()
            except Exception as err:  # noqa: BLE001 - the Cluster may be unreachable: try again soon
                log.warning("hub pub/sub: cannot read the Cluster's slot map (%s: %s)", type(err).__name__, err)
                self._refresh.wait(timeout=REFRESH_WHILE_DOWN)
                self._refresh.clear()
                continue
            gevent.sleep(REFRESH_GAP)
            down = not self.connected or self.wanted != set(self.route)
            self._refresh.wait(timeout=REFRESH_WHILE_DOWN if down else REFRESH_EVERY)
            self._refresh.clear()

    def _refresh_once(self) -> None:
        """Read the slot map; follow each channel on the master that owns it now; drop gone masters."""
        topology = self.topology.client
        if self.shards:  # the first map was read as the client was made
            topology.nodes_manager.initialize()
        masters: dict[str, Any] = {node.name: node for node in topology.get_primaries()}
        if not self.sharded:  # one master hears everything: keep the current one while it is a master
            current = next(iter(self.shards), None)
            masters = {current: masters[current]} if current in masters else dict(list(masters.items())[:1])
        for name in [name for name in self.shards if name not in masters]:
            log.info("hub pub/sub: %s is no longer a master here; its channels move", name)
            self.shards.pop(name).stop()
        for name, node in masters.items():
            if name not in self.shards:
                self.shards[name] = self._listener((node.host, int(node.port)))
        moved = 0
        for channel in [channel for channel in self.wanted if self.route.get(channel) != self._owner(channel)]:
            old = self.route.pop(channel, None)
            if old is not None and old in self.shards:
                self.shards[old].leave(channel)
            node = self._owner(channel)
            if node is not None:
                self.route[channel] = node
                self.shards[node].follow(channel)
                moved += old is not None
        if moved:
            self.moves += moved
            # Announcements made before a channel was subscribed on its new master are lost: the
            # hub reads them from the streams once every channel is subscribed again.
            self.on_reconnected()

    def _listener(self, address: tuple[str, int]) -> Listener:
        return Listener(self.url, address=address, sharded=self.sharded, on_reconnected=self.on_reconnected,
                        on_lost=self._refresh.set, **self._callbacks)
