"""The Redis clients of a worker process (a bounded, blocking pool; the hub's own connections), and the accessor.

`REDIS_URL` names a single Redis (`redis://`, `rediss://`, `unix://`), a Sentinel-managed master
(`redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]`) or a
Redis Cluster (`redis+cluster://[user:password@]host:port[,host:port...][?options]`, or
`rediss+cluster://` for TLS: any reachable nodes, the rest are discovered).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.cluster
import redis.sentinel
from flask import Flask, current_app
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import AbstractConnection, parse_url
from redis.retry import Retry

from .cluster import Client, ClusterClient, LazyCluster, is_cluster
from .errors import ConnectFailed

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # -> the scheme of each node


class _RetryOnlyBeforeSending:
    """A connection whose errors before a command is sent are ConnectFailed, and only those are retried.

    redis-py re-sends a command on any ConnectionError or TimeoutError, whether or not Redis ran it:
    a lost reply to an append would store the event twice. A failure to connect (or of the PING
    health check that precedes a command on an idle connection) is safe to retry; once a command is
    on the wire, an error is the caller's to handle (a 503: the write may or may not have run).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # Whatever the URL asked for (redis-py lets ?retry_on_timeout=true override keyword
        # arguments), only failures before a command is sent are retried.
        self.retry_on_timeout = False
        self.retry_on_error = []
        self.retry = _retry()

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except ConnectFailed:
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise ConnectFailed(str(err)) from err

    def check_health(self) -> None:
        try:
            super().check_health()  # type: ignore[misc]
        except ConnectFailed:
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise ConnectFailed(str(err)) from err


_SAFE_CLASSES: dict[type, type] = {}


def _safe_subclass(base: type) -> type[AbstractConnection]:
    if base not in _SAFE_CLASSES:
        _SAFE_CLASSES[base] = type(f"RetryBeforeSending{base.__name__}", (_RetryOnlyBeforeSending, base), {})
    return _SAFE_CLASSES[base]


def safe_connection_class(url: str) -> type[AbstractConnection]:
    """The connection class `url` asks for (TCP, TLS, unix socket), retrying only before sending."""
    return _safe_subclass(parse_url(url).get("connection_class", redis.Connection))


def _retry() -> Retry:
    # One more try after a failed connect: rides over a Redis restart, and a client still gets its
    # 503 within a second when Redis is down.
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(ConnectFailed,))


def connection_name(role: str) -> str:
    """The CLIENT SETNAME of this process's connections, so ops (and tests) can count them."""
    return f"oh-sse:{os.getpid()}:{role}"


@dataclass(frozen=True)
class SentinelUrl:
    """What a `redis+sentinel://` URL names: the sentinels, the service, and the master's options."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    options: dict[str, Any]


def _addresses(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """The host:port list of a URL's network location (credentials dropped)."""
    addresses = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        addresses.append((host, int(port) if port else default_port))
    return tuple(addresses)


def _url_options(parts: Any, scheme: str) -> dict[str, Any]:
    """The credentials and query options of a URL, as redis-py's own parsing gives them."""
    options: dict[str, Any] = {}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    options.update({k: v for k, v in parse_url(f"{scheme}://localhost/?{parts.query}").items()
                    if k not in ("host", "port", "db")})
    return options


def sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a `redis+sentinel://` URL; None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    sentinels = _addresses(parts.netloc, SENTINEL_PORT)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or not all(h for h, _ in sentinels):
        raise ValueError("a redis+sentinel:// URL needs host:port[,host:port...]/service_name")
    options = {"db": int(path[1]) if len(path) > 1 else 0, **_url_options(parts, "redis")}
    options.pop("connection_class", None)
    return SentinelUrl(sentinels, path[0], options)


@dataclass(frozen=True)
class ClusterUrl:
    """What a `redis+cluster://` URL names: nodes to discover the cluster from, and their options."""

    nodes: tuple[tuple[str, int], ...]
    options: dict[str, Any]


def cluster_url(url: str) -> ClusterUrl | None:
    """The parts of a `redis+cluster://` (or `rediss+cluster://`) URL; None for any other URL."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme)
    if scheme is None:
        return None
    nodes = _addresses(parts.netloc, 6379)
    if not all(h for h, _ in nodes):
        raise ValueError("a redis+cluster:// URL needs host:port[,host:port...]")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a redis+cluster:// URL names no database: a Redis Cluster has only database 0")
    return ClusterUrl(nodes, _url_options(parts, scheme))


_SENTINELS: dict[tuple, redis.sentinel.Sentinel] = {}


def _sentinel(target: SentinelUrl) -> redis.sentinel.Sentinel:
    key = (target.sentinels, target.service)
    if key not in _SENTINELS:
        sentinel_auth = {k: v for k, v in target.options.items() if k in ("username", "password")}
        _SENTINELS[key] = redis.sentinel.Sentinel(
            list(target.sentinels), socket_timeout=2.0,
            sentinel_kwargs={"socket_timeout": 2.0, "socket_connect_timeout": 2.0, **sentinel_auth},
        )
    return _SENTINELS[key]


class BlockingSentinelConnectionPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """A pool of the Sentinel-named master's connections that waits (bounded) for a free one."""




def _pool(url: str, *, size: int, timeout: float, role: str, socket_timeout: float | None, safe: bool,
          health_check_interval: int = 0) -> redis.ConnectionPool:
    retry = _retry() if safe else Retry(ExponentialBackoff(cap=0.2, base=0.05), 0)
    options: dict[str, Any] = dict(client_name=connection_name(role), max_connections=size, timeout=timeout,
                                   socket_timeout=socket_timeout, socket_connect_timeout=min(timeout, 2.0),
                                   health_check_interval=health_check_interval, retry=retry)
    target = sentinel_url(url)
    if target is None:
        if safe:
            options["connection_class"] = safe_connection_class(url)
        return redis.BlockingConnectionPool.from_url(url, **options)
    cls = redis.sentinel.SentinelManagedConnection
    options = {**options, **target.options}  # the URL's options win, as from_url does
    options["connection_class"] = _safe_subclass(cls) if safe else cls
    return BlockingSentinelConnectionPool(target.service, _sentinel(target), **options)


def _cluster_client(target: ClusterUrl, *, size: int, timeout: float, role: str, socket_timeout: float | None,
                    health_check_interval: int = 0) -> LazyCluster:
    """A Cluster client: per node a pool of at most `size` that waits for a free connection, nothing re-sent.

    redis-py's cluster client re-sends a command after a ConnectionError or TimeoutError (and a
    pipeline, each command whose reply was lost) as often as its `retry` allows: 0 here. MOVED,
    ASK and TRYAGAIN are still followed (Redis did not run the command); a failed connect is
    retried once by the connection class, as for a single Redis.
    """
    options = dict(target.options)
    base = options.pop("connection_class", redis.Connection)
    first, *rest = target.nodes
    options.update(client_name=connection_name(role), max_connections=size, timeout=timeout,
                   socket_timeout=socket_timeout, socket_connect_timeout=min(timeout, 2.0),
                   health_check_interval=health_check_interval)
    return LazyCluster(lambda: ClusterClient(
        # A url makes redis-py build every node's pool with connection_pool_class and our connection class.
        url=f"redis://{first[0]}:{first[1]}", startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in rest],
        retry=Retry(NoBackoff(), 0), connection_pool_class=redis.BlockingConnectionPool,
        connection_class=_safe_subclass(base), **options,
    ))


def make_client(url: str, size: int, timeout: float) -> Client:
    """The requests' client: at most `size` connections (per Cluster node), waiting (bounded) for a free one."""
    target = cluster_url(url)
    if target is not None:
        return _cluster_client(target, size=size, timeout=timeout, role="pool", socket_timeout=timeout,
                               health_check_interval=30)
    return redis.Redis(connection_pool=_pool(url, size=size, timeout=timeout, role="pool", socket_timeout=timeout,
                                             safe=True, health_check_interval=30))


def make_dedicated_client(url: str, role: str, socket_timeout: float | None) -> Client:
    """A client of exactly one connection (per Cluster node): the hub's control; nothing re-sent."""
    target = cluster_url(url)
    if target is not None:
        return _cluster_client(target, size=1, timeout=30, role=role, socket_timeout=socket_timeout)
    return redis.Redis(connection_pool=_pool(url, size=1, timeout=30, role=role, socket_timeout=socket_timeout,
                                             safe=False))


def close(client: Client) -> None:
    """Close every connection of a client (each node's, on a Cluster)."""
    if isinstance(client, LazyCluster):
        client = client.client if client.built else None
    if isinstance(client, redis.cluster.RedisCluster):
        # A node client made on a pool of ours does not close that pool itself.
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
        client.close()
    elif client is not None:
        client.connection_pool.disconnect()


def server_major(client: Client) -> int:
    """The major version of the Redis server; on a Cluster, the oldest of its masters'."""
    if not is_cluster(client):
        return int(str(client.info("server")["redis_version"]).split(".")[0])
    infos = client.info("server", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    if "redis_version" in infos:  # one master: redis-py answers its INFO itself
        infos = {"one": infos}
    return min(int(str(info["redis_version"]).split(".")[0]) for info in infos.values())


def connect_once(url: str, role: str, socket_timeout: float, address: tuple[str, int] | None = None) -> Any:
    """A connected connection (RESP2, no health checks) that never reconnects itself: the hub's pub/sub.

    redis-py reconnects a closed connection on its next send, which for a pub/sub connection
    would subscribe a new socket behind its reader's back; this one raises instead. On a
    Cluster, `address` says which node.
    """
    target, cluster = sentinel_url(url), cluster_url(url)
    if cluster is not None:
        if address is None:
            raise ValueError("a Cluster pub/sub connection needs the node's address")
        options = {**cluster.options, "host": address[0], "port": address[1]}
        cls = options.pop("connection_class", redis.Connection)
    elif target is None:
        options = parse_url(url)
        cls = options.pop("connection_class", redis.Connection)
    else:
        host, port = _sentinel(target).discover_master(target.service)  # asked again at every connect
        options, cls = {**target.options, "host": host, "port": port}, redis.Connection
    cls = _one_shot(cls)
    accepted = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in options.items() if k in accepted}  # pool options stay the pool's
    # RESP2: messages are plain replies to read (RESP3 would route them to a push handler).
    # health_check_interval 0: a health-check PING would read the replies that belong to the reader.
    options.update(client_name=connection_name(role), socket_timeout=socket_timeout, socket_connect_timeout=2.0,
                   health_check_interval=0, protocol=2)
    conn = cls(**options)
    conn.connect()
    return conn


_ONE_SHOT: dict[type, type] = {}


def _one_shot(cls: type) -> type:
    if cls not in _ONE_SHOT:
        def connect_check_health(self: Any, *args: Any, **kwargs: Any) -> None:
            if getattr(self, "_connected_once", False):
                raise redis.exceptions.ConnectionError("the pub/sub connection was lost")
            super(one_shot, self).connect_check_health(*args, **kwargs)
            self._connected_once = True

        one_shot = type(f"OneShot{cls.__name__}", (cls,), {"connect_check_health": connect_check_health})
        _ONE_SHOT[cls] = one_shot
    return _ONE_SHOT[cls]


def init_app(app: Flask) -> None:
    """Create the worker's client; connections are opened lazily, on first use."""
    app.extensions["redis"] = make_client(app.config["REDIS_URL"], app.config["REDIS_POOL_SIZE"],
                                          app.config["REDIS_TIMEOUT_SECONDS"])


def get_redis(app: Any = None) -> Client:
    """The worker's Redis client."""
    return (app or current_app).extensions["redis"]
