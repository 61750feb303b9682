"""The one Redis client (a bounded, blocking pool) of a worker process, and its accessor."""
from __future__ import annotations

import os
from typing import Any

import redis
from flask import Flask, current_app
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# A command that fails on a dead pooled connection is retried once on a fresh one: enough to ride
# over a Redis restart, short enough that a client gets its 503 within a second when Redis is down.
_RETRY_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=_RETRY_ERRORS)


def connection_name(role: str) -> str:
    """The CLIENT SETNAME of this process's connections, so ops (and tests) can count them."""
    return f"oh-sse:{os.getpid()}:{role}"


def make_pool(url: str, size: int, timeout: float) -> redis.ConnectionPool:
    """A pool that waits (bounded) for a free connection instead of opening more than `size`."""
    return redis.BlockingConnectionPool.from_url(
        url,
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
