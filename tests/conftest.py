"""Fixtures: a Redis server of the tests' own, the app, its test client, API keys, gunicorn servers."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import redis
import redis.cluster

from app import create_app
from app.redis import close
from app.store import Store

from .browser import axe_source, browser, fake_llm, page, start_web  # noqa: F401 (fixtures, for every test module)
from .servers import Gunicorn, RedisServer
from .sse_client import OPENED
from .topologies import RedisCluster3

# TEST_REDIS_TOPOLOGY=cluster runs the suite's Redis-facing tests on a 3-master Redis Cluster
# (redis+cluster://) instead of one redis-server: the same tests, the other topology.
ON_CLUSTER = os.environ.get("TEST_REDIS_TOPOLOGY", "") == "cluster"

# Property tests search with a new random seed on every local run (that is how they find
# things); under CI they run the same examples each time, so a landing never fails on a draw
# no one can reproduce. HYPOTHESIS_PROFILE=random searches in CI too.
hypothesis.settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") and os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
    hypothesis.settings.load_profile("ci")

# The per-key rate limits are off in every app and server the tests start (their environment is a
# copy of this one): tests post hundreds of events a second with one key. tests/test_rate_limits.py
# turns them on for its own.
os.environ["POST_RATE_LIMIT"] = "0"
os.environ["STREAM_RATE_LIMIT"] = "0"
# Tests that read openhands_greenlets want the count as of their scrape, not of the last periodic one.
os.environ.setdefault("GREENLET_COUNT_SECONDS", "0")


@pytest.fixture(autouse=True)
def close_streams() -> Iterator[None]:
    """Close every SSE connection a test opened."""
    yield
    while OPENED:
        OPENED.pop().close()


# Every API key this test process makes, for the audit of the run's logs at its end
# (tests/test_zz_log_audit.py): no log line of the whole run may hold one.
MADE_KEYS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def record_made_keys() -> Iterator[None]:
    """Record each key Store.create_api_key makes in this process (the fixtures' keys, the apps')."""
    original = Store.create_api_key

    def recording(self: Store, user_id: str) -> tuple[str, str]:
        key_id, key = original(self, user_id)
        MADE_KEYS.append(key)
        return key_id, key

    Store.create_api_key = recording  # type: ignore[method-assign]
    yield
    Store.create_api_key = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | RedisCluster3]:
    """One redis-server (or Cluster) for the whole run, on free ports: the machine's own Redis is never touched."""
    server = (RedisCluster3 if ON_CLUSTER else RedisServer)(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def redis_client(redis_server: RedisServer | RedisCluster3) -> Iterator[redis.Redis]:
    """A client on the tests' Redis (a cluster client on a Cluster), flushed before and after each test."""
    if isinstance(redis_server, RedisCluster3):
        client = redis_server.client()
        flush = redis_server.flushall
    else:
        client = redis.Redis.from_url(redis_server.url)
        flush = client.flushdb
    flush()
    yield client
    flush()
    client.close()


@pytest.fixture()
def app(redis_server: RedisServer, redis_client: redis.Redis):
    """The app on the tests' Redis, defaults as in production."""
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True})
    yield app
    close(app.extensions["redis"])


@pytest.fixture()
def client(app):
    """Flask's test client."""
    return app.test_client()


@pytest.fixture()
def make_key(app):
    """Create an API key for a user; returns the key."""
    def make(user_id: str = "alice") -> str:
        return app.extensions["store"].create_api_key(user_id)[1]
    return make


@pytest.fixture()
def key(make_key) -> str:
    """Alice's key."""
    return make_key("alice")


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


def create(client, key: str, **body) -> str:
    """Create a conversation through the test client; its id."""
    response = client.post("/api/conversations", json=body, headers=bearer(key))
    assert response.status_code == 200, response.data
    return response.get_json()["conversation_id"]


def xrange_calls(redis_client) -> int:
    """How many XRANGE commands the tests' Redis (every master of a Cluster) has run."""
    if isinstance(redis_client, redis.cluster.RedisCluster):
        stats = list(redis_client.info("commandstats", target_nodes=redis.cluster.RedisCluster.PRIMARIES).values())
    else:
        stats = [redis_client.info("commandstats")]
    return sum(node.get("cmdstat_xrange", {}).get("calls", 0) for node in stats)


def assert_no_trace(response) -> None:
    """The response shows nothing of the server's insides."""
    text = response.get_data(as_text=True)
    for marker in ("Traceback", 'File "', ", line ", "Exception", "<html", "<!doctype"):
        assert marker.lower() not in text.lower(), text


def assert_error(response, status: int, code: str | None = None) -> dict:
    """A JSON error of API.md with this status (and machine code), without a stack trace; its body."""
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"status", "error", "message"}
    assert body["status"] == "error"
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code
    assert_no_trace(response)
    return body


@pytest.fixture()
def start_server(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path):
    """Start gunicorn (gevent workers) with extra settings; every server is stopped after the test."""
    started: list[Gunicorn] = []

    def start(redis_url: str | None = None, workers: int = 1, wsgi_app: str = "wsgi:app", **env: str) -> Gunicorn:
        server = Gunicorn(redis_url or redis_server.url, workers=workers, wsgi_app=wsgi_app, **env)
        started.append(server)
        return server.start(tmp_path / f"gunicorn-{len(started)}.log")

    yield start
    for server in started:
        server.stop()


@pytest.fixture()
def server(start_server):
    """One gevent worker, heartbeat 1 s (a test module may define its own)."""
    return start_server()


@pytest.fixture()
def api(server, make_key) -> Api:
    """A JSON client for alice on `server`."""
    return Api(server.base, make_key("alice"))


class Api:
    """A tiny JSON client for a running server (urllib: real sockets, no test client)."""

    def __init__(self, base: str, key: str):
        self.base = base
        self.key = key

    def call(self, method: str, path: str, body: object | None = None, headers: dict[str, str] | None = None):
        """(status, JSON body, headers)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null"), dict(err.headers)

    def create(self, **body) -> str:
        """Create a conversation; its id."""
        status, answer, _ = self.call("POST", "/api/conversations", body)
        assert status == 200, answer
        return answer["conversation_id"]

    def post(self, cid: str, **action) -> int:
        """Post an action; its event id."""
        status, answer, _ = self.call("POST", f"/api/conversations/{cid}/events", action or
                                      {"type": "user_message", "content": "hi"})
        assert status == 200, answer
        return answer["event_id"]
