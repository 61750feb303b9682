"""The one Redis client (a bounded, blocking pool) of a worker process, and its accessor."""
from __future__ import annotations

import os
from typing import Any

import redis
from flask import Flask, current_app
from redis.backoff import ExponentialBackoff
from redis.connection import AbstractConnection, parse_url
from redis.retry import Retry


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


def safe_connection_class(url: str) -> type[AbstractConnection]:
    """The connection class `url` asks for (TCP, TLS, unix socket), retrying only before sending."""
    base = parse_url(url).get("connection_class", redis.Connection)
    if base not in _SAFE_CLASSES:
        _SAFE_CLASSES[base] = type(f"RetryBeforeSending{base.__name__}", (_RetryOnlyBeforeSending, base), {})
    return _SAFE_CLASSES[base]


def _retry() -> Retry:
    # One more try after a failed connect: rides over a Redis restart, and a client still gets its
    # 503 within a second when Redis is down.
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(ConnectFailed,))


def connection_name(role: str) -> str:
    """The CLIENT SETNAME of this process's connections, so ops (and tests) can count them."""
    return f"oh-sse:{os.getpid()}:{role}"


def make_pool(url: str, size: int, timeout: float) -> redis.ConnectionPool:
    """A pool that waits (bounded) for a free connection instead of opening more than `size`."""
    return redis.BlockingConnectionPool.from_url(
        url,
        connection_class=safe_connection_class(url),
        client_name=connection_name("pool"),
        max_connections=size,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        health_check_interval=30,
        retry=_retry(),
    )


def make_client(pool: redis.ConnectionPool) -> redis.Redis:
    """A client on the given pool."""
    return redis.Redis(connection_pool=pool)


def make_dedicated_client(url: str, role: str, socket_timeout: float | None) -> redis.Redis:
    """A client of exactly one connection (the hub's reader, its control): pipelines included."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=1,
        timeout=30,
        client_name=connection_name(role),
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 0),
    )
    return redis.Redis(connection_pool=pool)


def init_app(app: Flask) -> None:
    """Create the worker's pool; connections are opened lazily, on first use."""
    pool = make_pool(app.config["REDIS_URL"], app.config["REDIS_POOL_SIZE"], app.config["REDIS_TIMEOUT_SECONDS"])
    app.extensions["redis"] = make_client(pool)


def get_redis(app: Any = None) -> redis.Redis:
    """The worker's Redis client."""
    return (app or current_app).extensions["redis"]
