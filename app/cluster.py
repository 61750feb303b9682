"""What a Redis Cluster needs beyond the cluster client: pipelines that stay on one node.

redis-py's cluster pipeline refuses scripts, sends a keyless command (WAIT) to any node, and
re-sends each command whose reply was lost. A script followed by WAIT must run on one
connection of the master that owns the script's slot, so these pipelines are plain ones on that
master's client; a redirection (the slot moved meanwhile) means Redis ran nothing, so it is
followed here, a bounded number of times.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.cluster
import redis.commands.core
from redis.commands.core import Script
from redis.connection import Encoder
from redis.exceptions import AskError, MovedError, TryAgainError

from .errors import ConnectFailed


def _before_sending(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except redis.exceptions.RedisClusterException as err:
        # Not a RedisError in redis-py, yet raised before anything is sent (no node answers to
        # learn the slot map from, a slot no node serves): as unavailable as a failed connect.
        raise ConnectFailed(f"Redis Cluster: {err}") from err


class ClusterClient(redis.cluster.RedisCluster):
    """The cluster client, whose own errors are ConnectFailed (a RedisError): callers answer 503, not 500."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return _before_sending(super().execute_command, *args, **kwargs)

    def get_node_from_slot_of(self, args: tuple[Any, ...]) -> Any:
        """The master that serves the slot of a command's keys."""
        return self.nodes_manager.get_node_from_slot(self.determine_slot(*args))

    def pipeline(self, transaction: bool = False, shard_hint: Any = None) -> NodeByNodePipeline:
        """A pipeline that sends each master's commands on one of its connections, one master at a time.

        redis-py's cluster pipeline holds a connection of every master it needs while it waits for
        the next (two such pipelines can wait on each other until the pool times out), and it
        re-sends each command whose reply was lost. This one takes one connection at a time and
        re-sends only what Redis redirected (it ran nothing).
        """
        if transaction:
            raise ValueError("no MULTI across a Cluster's nodes")
        return NodeByNodePipeline(self)


class NodeByNodePipeline(redis.commands.core.CoreCommands):
    """Commands queued for a Cluster, run as one plain pipeline per master, in turn; replies in order."""

    def __init__(self, cluster: ClusterClient):
        self.cluster = cluster
        self.queued: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def execute_command(self, *args: Any, **options: Any) -> NodeByNodePipeline:
        """Queue a command."""
        self.queued.append((args, options))
        return self

    def get_encoder(self) -> Encoder:
        """The cluster's encoder (for the commands that encode their arguments)."""
        return self.cluster.get_encoder()

    def __len__(self) -> int:
        return len(self.queued)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run every queued command; their replies, in the order they were queued."""
        queued, self.queued = self.queued, []
        groups: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for position, (args, _options) in enumerate(queued):
            node = _before_sending(self.cluster.get_node_from_slot_of, args)
            groups.setdefault(node.name, []).append(position)
            nodes[node.name] = node
        replies: list[Any] = [None] * len(queued)
        for name, positions in groups.items():
            pipe = self.cluster.get_redis_connection(nodes[name]).pipeline(transaction=False)
            for i in positions:
                args, options = queued[i]
                pipe.execute_command(*args, **options)
            for i, reply in zip(positions, _execute_on_node(self.cluster, pipe), strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, MovedError | AskError | TryAgainError):
                # Not run: sent again through the cluster client, which follows the redirection.
                args, options = queued[i]
                try:
                    replies[i] = self.cluster.execute_command(*args, **options)
                except redis.RedisError as err:
                    replies[i] = err
        if raise_on_error:
            error = next((r for r in replies if isinstance(r, Exception)), None)
            if error is not None:
                raise error
        return replies


class LazyCluster:
    """A Cluster client made on first use, as a pool connects on first use.

    redis-py's client asks a node for the slot map and the command table as it is made: made
    eagerly, a worker could not start while the Cluster is unreachable. Until it answers, each
    use raises ConnectFailed (a 503), and the next use tries again.
    """

    def __init__(self, build: Callable[[], redis.cluster.RedisCluster]):
        self._build = build
        self._client: redis.cluster.RedisCluster | None = None
        # Made after gevent patched threading (the app is never preloaded): a greenlet's lock.
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.cluster.RedisCluster:
        """The cluster client, made now if it is not yet."""
        if self._client is None:
            with self._lock:  # one client, however many requests arrive before it is made
                if self._client is None:
                    self._client = _before_sending(self._build)
        return self._client

    @property
    def built(self) -> bool:
        """Whether the client was made (connections may be open)."""
        return self._client is not None

    @staticmethod
    def get_encoder() -> Encoder:
        """The encoder of the scripts registered on this client (redis-py's defaults)."""
        return Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        """A script run on this client, registered without connecting."""
        return Script(self, script)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.client, name)


Client = redis.Redis | redis.cluster.RedisCluster | LazyCluster


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster."""
    return isinstance(client, LazyCluster | redis.cluster.RedisCluster)


REDIRECTIONS = 5  # a slot being moved: at most this many hops before the error is the caller's


def run_on_key_node(client: Client, key: str, build: Callable[[Any], None]) -> list[Any]:
    """Run the commands `build` queues on a plain pipeline of the node that owns `key`; their replies.

    On a single Redis (or Sentinel) it is the client's own pipeline. Errors are raised as a
    pipeline raises them.
    """
    if not is_cluster(client):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        return pipe.execute()
    node, asking = None, False
    for _ in range(REDIRECTIONS):
        target = node or client.get_node_from_key(key)
        pipe = client.get_redis_connection(target).pipeline(transaction=False)
        if asking:
            pipe.execute_command("ASKING")
        build(pipe)
        replies = _execute_on_node(client, pipe)
        if asking:
            replies = replies[1:]
        redirect = next((r for r in replies if isinstance(r, MovedError | AskError | TryAgainError)), None)
        if redirect is None:
            error = next((r for r in replies if isinstance(r, Exception)), None)
            if error is not None:
                raise error
            return replies
        node, asking = None, False
        if isinstance(redirect, MovedError):
            forget_slots(client)  # the slot map changed: learn the new one
        elif isinstance(redirect, AskError):
            node, asking = _node(client, redirect.host, redirect.port), True
        else:
            time.sleep(0.05)  # TRYAGAIN: keys of the slot are mid-migration
    raise redis.exceptions.ClusterError("the slot kept moving; retry")  # a 503 redis_try_again


def forget_slots(client: Client) -> None:
    """Learn a Cluster's slot map anew (after a redirection a plain pipeline cannot follow, or a lost node)."""
    if is_cluster(client):
        _before_sending(client.nodes_manager.initialize)


def _execute_on_node(cluster: Any, pipe: Any) -> list[Any]:
    """A node's plain pipeline, run; a node that cannot be reached makes the slot map be read again.

    Nothing is re-sent here: after a failover the next request goes to the new master.
    """
    try:
        return pipe.execute(raise_on_error=False)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        try:
            forget_slots(cluster)
        except redis.RedisError:
            pass  # the Cluster answers no one now: the next request reads the map again
        raise


def _node(client: redis.cluster.RedisCluster, host: str, port: int) -> redis.cluster.ClusterNode:
    node = client.get_node(host=host, port=port)
    if node is None:  # a node the map does not know yet
        client.nodes_manager.initialize()
        node = client.get_node(host=host, port=port)
    if node is None:
        raise redis.exceptions.ClusterError(f"redirected to an unknown node {host}:{port}")
    return node


def pipelines_per_node(client: Client, keys: list[str]) -> dict[Any, list[int]]:
    """The positions of `keys` grouped by the pipeline that can carry them (one per Cluster master)."""
    if not is_cluster(client):
        return {client: list(range(len(keys)))}
    groups: dict[str, list[int]] = {}
    nodes: dict[str, Any] = {}
    for position, key in enumerate(keys):
        node = client.get_node_from_key(key)
        groups.setdefault(node.name, []).append(position)
        nodes[node.name] = node
    return {client.get_redis_connection(nodes[name]): positions for name, positions in groups.items()}
