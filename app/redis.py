"""The Redis clients of a worker process (a bounded, blocking pool; the hub's own connections), and the accessor.

`REDIS_URL` names a single Redis (`redis://`, `rediss://`, `unix://`) or a Sentinel-managed master
(`redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from flask import Flask, current_app
from redis.backoff import ExponentialBackoff
from redis.connection import AbstractConnection, parse_url
from redis.retry import Retry

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


class ConnectFailed(redis.exceptions.ConnectionError):
    """Connecting, or the health check before a command, failed: no command of ours reached Redis."""


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


def sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a `redis+sentinel://` URL; None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    sentinels = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or not all(h for h, _ in sentinels):
        raise ValueError("a redis+sentinel:// URL needs host:port[,host:port...]/service_name")
    options: dict[str, Any] = {"db": int(path[1]) if len(path) > 1 else 0}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.query:  # redis-py's own parsing of the query options
        options.update({k: v for k, v in parse_url(f"redis://localhost/?{parts.query}").items()
                        if k not in ("host", "port", "db")})
    return SentinelUrl(tuple(sentinels), path[0], options)


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


def make_pool(url: str, size: int, timeout: float) -> redis.ConnectionPool:
    """A pool that waits (bounded) for a free connection instead of opening more than `size`."""
    return _pool(url, size=size, timeout=timeout, role="pool", socket_timeout=timeout, safe=True,
                 health_check_interval=30)


def make_client(pool: redis.ConnectionPool) -> redis.Redis:
    """A client on the given pool."""
    return redis.Redis(connection_pool=pool)


def make_dedicated_client(url: str, role: str, socket_timeout: float | None) -> redis.Redis:
    """A client of exactly one connection (the hub's control): pipelines included, nothing re-sent."""
    return redis.Redis(connection_pool=_pool(url, size=1, timeout=30, role=role, socket_timeout=socket_timeout,
                                             safe=False))


def connect_once(url: str, role: str, socket_timeout: float) -> Any:
    """A connected connection (RESP2, no health checks) that never reconnects itself: the hub's pub/sub.

    redis-py reconnects a closed connection on its next send, which for a pub/sub connection
    would subscribe a new socket behind its reader's back; this one raises instead.
    """
    target = sentinel_url(url)
    if target is None:
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
    """Create the worker's pool; connections are opened lazily, on first use."""
    pool = make_pool(app.config["REDIS_URL"], app.config["REDIS_POOL_SIZE"], app.config["REDIS_TIMEOUT_SECONDS"])
    app.extensions["redis"] = make_client(pool)


def get_redis(app: Any = None) -> redis.Redis:
    """The worker's Redis client."""
    return (app or current_app).extensions["redis"]
