"""What a Redis Cluster needs beyond the cluster client: pipelines that stay on one node.

redis-py's cluster pipeline refuses scripts, sends a keyless command (WAIT) to any node, and
re-sends each command whose reply was lost. A script followed by WAIT must run on one
connection of the master that owns the script's slot, so these pipelines are plain ones on that
master's client; a redirection (the slot moved meanwhile) means Redis ran nothing, so it is
followed here, a bounded number of times.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import redis.cluster
from redis.exceptions import AskError, MovedError, TryAgainError

from .redis import Client, is_cluster

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
        replies = pipe.execute(raise_on_error=False)
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
            client.nodes_manager.initialize()  # the slot map changed: learn the new one
        elif isinstance(redirect, AskError):
            node, asking = _node(client, redirect.host, redirect.port), True
        else:
            time.sleep(0.05)  # TRYAGAIN: keys of the slot are mid-migration
    raise redis.exceptions.ClusterError(f"the slot of {key!r} kept moving; retry")


def forget_slots(client: Client) -> None:
    """Learn a Cluster's slot map anew (after a redirection a plain pipeline cannot follow)."""
    if is_cluster(client):
        client.nodes_manager.initialize()


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
