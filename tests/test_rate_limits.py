"""Per-key rate limits (POST_RATE_LIMIT, STREAM_RATE_LIMIT): one bucket per API key in Redis, shared by every worker.

Most tests share one gunicorn with two gevent workers and small limits: 60 posts a minute (a
token a second, so Retry-After is 1) and 30 stream opens a minute (one every 2 s). The rest of the
suite runs with both limits off (tests/conftest.py).
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app import create_app
from app.config import ConfigError, load_settings
from app.lua import RATE_LIMIT_LUA
from app.ratelimit import interval_us, rate_limit_key, retry_after, tolerance_us
from app.redis import close

from .conftest import ON_CLUSTER, Api, bearer
from .faultproxy import FaultProxy, command_name
from .servers import Gunicorn, RedisServer, wait_until
from .sse_client import open_stream

POSTS_PER_MINUTE = 60
STREAMS_PER_MINUTE = 30
STREAM_CAP = 40  # per user: above one key's burst of opens, so a second key of the user reaches it
SSE = "/api/sse/conversations/{}/events"


@pytest.fixture(scope="module")
def limited(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """Two gevent workers with small limits, for the whole module (keys and conversations are made per test)."""
    server = Gunicorn(redis_server.url, workers=2, POST_RATE_LIMIT=str(POSTS_PER_MINUTE),
                      STREAM_RATE_LIMIT=str(STREAMS_PER_MINUTE), SSE_MAX_STREAMS_PER_USER=str(STREAM_CAP))
    try:
        yield server.start(tmp_path_factory.mktemp("rate-limits") / "gunicorn.log")
    finally:
        server.stop()


def key_id(key: str) -> str:
    """The key id inside an API key (ohk_<16 hex>_<secret>)."""
    return key[4:20]


def call(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str] | None = None,
         body: object | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request on a kept-alive connection: (status, JSON body, headers with lower-case names)."""
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={**({"Content-Type": "application/json"} if data else {}),
                                                   **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, json.loads(raw) if raw else None, {k.lower(): v for k, v in resp.getheaders()}


@pytest.fixture()
def conns(limited) -> Iterator[list[http.client.HTTPConnection]]:
    """Two kept-alive connections, held by different workers (each says its pid on /healthz); closed after the test."""
    by_pid: dict[int, http.client.HTTPConnection] = {}

    def both() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=10)
        pid = call(conn, "GET", "/healthz")[1]["worker_pid"]
        if by_pid.setdefault(pid, conn) is not conn:
            conn.close()  # that worker has one already
        return len(by_pid) == 2

    try:
        wait_until(both, 30, interval=0.01, what="a connection to each worker")  # a worker just started may lag
        yield list(by_pid.values())
    finally:
        for conn in by_pid.values():
            conn.close()


def assert_rate_limited(status: int, body: Any, headers: dict[str, str]) -> int:
    """The 429 of a rate limit: API.md's JSON error, code rate_limited, Retry-After in whole seconds >= 1; those."""
    assert status == 429, (status, body)
    assert headers["content-type"] == "application/json"
    assert set(body) == {"status", "error", "message"} and body["status"] == "error", body
    assert body["error"] == "rate_limited" and "API key" in body["message"], body
    assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1, headers
    return int(headers["retry-after"])


def post_until_refused(conns: list[http.client.HTTPConnection], key: str, cid: str,
                       ) -> tuple[int, tuple[int, Any, dict[str, str]], str]:
    """Post (on each connection in turn, each with an Idempotency-Key) until a 429: (200s, the 429, its key)."""
    for i in range(4 * POSTS_PER_MINUTE):
        answer = call(conns[i % len(conns)], "POST", f"/api/conversations/{cid}/events",
                      {**bearer(key), "Idempotency-Key": f"post-{i}"}, {"type": "note", "n": i})
        if answer[0] != 200:
            return i, answer, f"post-{i}"
    raise AssertionError(f"{4 * POSTS_PER_MINUTE} posts and no 429")


def test_one_limit_across_both_workers_answered_429_with_retry_after(limited, conns, make_key):
    key = make_key("alice")
    started = time.monotonic()
    cid = Api(limited.base, key).create()  # a create is a post too
    ok, refusal, _ = post_until_refused(conns, key, cid)
    elapsed = time.monotonic() - started
    assert_rate_limited(*refusal)
    # A burst of 60, then one a second: two buckets (one per worker) would have let ~120 through.
    assert POSTS_PER_MINUTE <= 1 + ok <= POSTS_PER_MINUTE + int(elapsed) + 1, (ok, elapsed)


def test_a_refused_post_stores_nothing_and_passes_after_retry_after(limited, conns, make_key):
    key = make_key("alice")
    api = Api(limited.base, key)
    cid = api.create()
    ok, refusal, idem = post_until_refused(conns, key, cid)
    wait = assert_rate_limited(*refusal)
    assert wait == 1  # a token a second
    # Stored: exactly the posts answered 200 (reads are not limited).
    status, conversation, _ = api.call("GET", f"/api/conversations/{cid}")
    assert status == 200 and conversation["last_event_id"] == ok - 1
    # A create refused too stores nothing (a token a second may let one or two through first: those are stored).
    made = []
    for _ in range(5):
        status, body, headers = call(conns[0], "POST", "/api/conversations", bearer(key), {"initial_user_msg": "x"})
        if status != 200:
            break
        made.append(body["conversation_id"])
    assert_rate_limited(status, body, headers)
    assert len(made) <= 2, made
    assert sorted(c["conversation_id"] for c in api.call("GET", "/api/conversations")[1]["results"]) \
        == sorted([cid, *made])
    time.sleep(int(headers["retry-after"]))  # what the last answer asked for
    # The refused post, sent again with its Idempotency-Key: stored now, once (the 429 kept no answer).
    status, answer, _ = call(conns[1], "POST", f"/api/conversations/{cid}/events",
                             {**bearer(key), "Idempotency-Key": idem}, {"type": "note", "n": ok})
    assert status == 200, answer
    events = api.call("GET", f"/api/conversations/{cid}/events?limit=1000")[1]["events"]
    assert [e["n"] for e in events] == list(range(ok + 1))
    assert answer["event_id"] == ok


def test_the_limit_is_per_key_and_a_keys_cookie_shares_it(limited, conns, make_key):
    key, second_key, bobs_key = make_key("alice"), make_key("alice"), make_key("bob")
    status, _, headers = call(conns[0], "GET", "/api/conversations", bearer(key))
    cookie = headers["set-cookie"].split(";", 1)[0]
    cid = Api(limited.base, key).create()
    post_until_refused(conns, key, cid)
    # Another key of the same user, another user: their own buckets.
    status, answer, _ = call(conns[1], "POST", f"/api/conversations/{cid}/events", bearer(second_key), {"type": "a"})
    assert status == 200, answer
    assert Api(limited.base, bobs_key).create()
    # The session cookie the limited key minted counts against that key: refused within a post or two
    # (a token may have come meanwhile), where a bucket of its own would let 60 through.
    for _ in range(3):
        answer = call(conns[0], "POST", f"/api/conversations/{cid}/events", {"Cookie": cookie}, {"type": "b"})
        if answer[0] != 200:
            break
    assert_rate_limited(*answer)


def test_stream_opens_are_counted_per_key(limited, make_key, redis_client):
    key, second_key = make_key("dave"), make_key("dave")
    cid = Api(limited.base, key).create()
    started = time.monotonic()
    opened = []
    for _ in range(3 * STREAMS_PER_MINUTE):
        stream = open_stream(limited.port, SSE.format(cid), bearer(key))
        if stream.status != 200:
            break
        opened.append(stream)  # kept open: only opens count, not open streams (the cap is above them)
    elapsed = time.monotonic() - started
    wait = assert_rate_limited(stream.status, json.loads(stream.body), stream.headers)
    assert STREAMS_PER_MINUTE <= len(opened) <= STREAMS_PER_MINUTE + int(elapsed / 2) + 1, (len(opened), elapsed)
    assert wait in (1, 2)  # one open every 2 s
    assert open_stream(limited.port, SSE.format(cid), bearer(second_key)).status == 200  # its own bucket
    time.sleep(wait)
    assert open_stream(limited.port, SSE.format(cid), bearer(key)).status == 200
    # A HEAD opens nothing and is not counted.
    bucket = redis_client.get(rate_limit_key(key_id(key), "stream"))
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=10)
    assert call(conn, "HEAD", SSE.format(cid), bearer(key))[0] == 200
    conn.close()
    assert redis_client.get(rate_limit_key(key_id(key), "stream")) == bucket


def test_refused_credentials_spend_no_ones_budget(limited, make_key, redis_client, app):
    key = make_key("frank")
    cid = Api(limited.base, key).create()  # counted: the post bucket exists, the stream bucket not yet
    forged = f"ohk_{key_id(key)}_{'x' * 43}"
    revoked = make_key("frank")
    app.extensions["store"].revoke_api_key(key_id(revoked))
    for bad in (forged, revoked):
        for _ in range(5):
            assert open_stream(limited.port, SSE.format(cid), bearer(bad)).status == 401
    assert not redis_client.exists(rate_limit_key(key_id(key), "stream"), rate_limit_key(key_id(revoked), "stream"))
    before = redis_client.get(rate_limit_key(key_id(key), "post"))
    api = Api(limited.base, forged)
    for _ in range(5):
        assert api.call("POST", f"/api/conversations/{cid}/events", {"type": "x"})[0] == 401
    assert redis_client.get(rate_limit_key(key_id(key), "post")) == before
    assert open_stream(limited.port, SSE.format(cid), bearer(key)).status == 200
    assert Api(limited.base, key).post(cid, type="x") == 0


def test_the_per_user_stream_cap_is_a_429_with_retry_after(limited, make_key):
    keys = [make_key("erin"), make_key("erin")]
    cid = Api(limited.base, keys[0]).create()
    opened = [open_stream(limited.port, SSE.format(cid), bearer(keys[i // STREAMS_PER_MINUTE]))
              for i in range(STREAM_CAP)]
    assert [s.status for s in opened] == [200] * STREAM_CAP
    refused = open_stream(limited.port, SSE.format(cid), bearer(keys[1]))  # its key has opens left, the user no slot
    assert refused.status == 429
    body = json.loads(refused.body)
    assert set(body) == {"status", "error", "message"} and body["error"] == "too_many_requests", body
    assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1


# The Flask app alone (no gunicorn): the limits' settings, and the limiter against Redis directly ------------------

@pytest.fixture()
def app_with(redis_server, redis_client) -> Iterator:
    """Make apps on the tests' Redis with the settings given; closed after the test."""
    made = []

    def make(**config: Any):
        made.append(create_app({"REDIS_URL": redis_server.url, "TESTING": True, **config}))
        return made[-1]

    yield make
    for app in made:
        close(app.extensions["redis"])


def test_limits_of_0_are_off(app_with, redis_client):
    app = app_with(POST_RATE_LIMIT=0, STREAM_RATE_LIMIT=0)
    client, key = app.test_client(), app.extensions["store"].create_api_key("alice")[1]
    cid = client.post("/api/conversations", json={}, headers=bearer(key)).get_json()["conversation_id"]
    for _ in range(5):
        assert client.post(f"/api/conversations/{cid}/events", json={"type": "x"}, headers=bearer(key)).status_code \
            == 200
        # The test client has no gevent: a stream open ends in a 503 after the point where it would be counted.
        assert client.get(SSE.format(cid), headers=bearer(key)).status_code == 503
    assert not redis_client.exists(rate_limit_key(key_id(key), "post"), rate_limit_key(key_id(key), "stream"))


def test_every_post_and_open_counts_before_anything_else(app_with, redis_client):
    app = app_with(POST_RATE_LIMIT=2, STREAM_RATE_LIMIT=1)
    client, key = app.test_client(), app.extensions["store"].create_api_key("alice")[1]
    cid = client.post("/api/conversations", json={}, headers=bearer(key)).get_json()["conversation_id"]
    assert client.post(f"/api/conversations/{cid}/events", data=b"[", content_type="application/json",
                       headers=bearer(key)).status_code == 400  # counted: every authenticated post is
    for refused in (client.post("/api/conversations", json={"initial_user_msg": "hi"}, headers=bearer(key)),
                    client.post(f"/api/conversations/{cid}/events", json={"type": "x"}, headers=bearer(key))):
        assert refused.status_code == 429 and refused.get_json()["error"] == "rate_limited"
        assert refused.headers["Retry-After"] == "30"  # 2 a minute: one every 30 s
    assert [c["conversation_id"] for c in client.get("/api/conversations", headers=bearer(key)).get_json()["results"]] \
        == [cid]
    assert client.get(f"/api/conversations/{cid}", headers=bearer(key)).get_json()["last_event_id"] == -1
    assert client.get(SSE.format(cid), headers=bearer(key)).status_code == 503  # counted, then no gevent
    assert client.get(SSE.format(cid), headers=bearer(key)).status_code == 429
    assert client.get(SSE.format("not-a-conversation"), headers=bearer(key)).status_code == 429  # before the 404


def test_a_cookie_write_from_another_origin_is_refused_uncounted_and_options_still_needs_credentials(
        app_with, redis_client):
    app = app_with(POST_RATE_LIMIT=2)
    client, key = app.test_client(), app.extensions["store"].create_api_key("alice")[1]
    client.get("/api/conversations", headers=bearer(key))  # mints the session cookie, kept by the test client
    for origin in ("https://elsewhere.example", "https://elsewhere.example", "https://elsewhere.example"):
        assert client.post("/api/conversations", json={}, headers={"Origin": origin}).status_code == 403
    assert not redis_client.exists(rate_limit_key(key_id(key), "post"))
    assert client.post("/api/conversations", json={}).status_code == 200  # the same origin's: counted
    assert redis_client.exists(rate_limit_key(key_id(key), "post"))
    # The posting views authenticate themselves; OPTIONS on their paths is still authenticated first.
    cid = client.post("/api/conversations", json={}, headers=bearer(key)).get_json()["conversation_id"]
    for path in ("/api/conversations", f"/api/conversations/{cid}/events"):
        client.delete_cookie("oh_session")  # a Bearer caller's 200 sets it again
        assert client.options(path).status_code == 401
        answer = client.options(path, headers=bearer(key))
        assert answer.status_code == 200 and "POST" in answer.headers["Allow"]


@pytest.mark.skipif(ON_CLUSTER, reason="the fault proxy stands in front of one redis-server")
def test_a_lost_reply_of_the_limiter_is_a_503_and_counted_once(redis_server, redis_client, app_with):
    store = app_with().extensions["store"]
    key = store.create_api_key("alice")[1]
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository=None, branch=None, title="t", initial_user_msg=None)
    proxy = FaultProxy("127.0.0.1", redis_server.port).start()
    try:
        app = app_with(REDIS_URL=proxy.url, POST_RATE_LIMIT=POSTS_PER_MINUTE, STREAM_RATE_LIMIT=STREAMS_PER_MINUTE)
        client = app.test_client()
        for kind, request in (("post", lambda: client.post(f"/api/conversations/{cid}/events", json={"type": "x"},
                                                           headers=bearer(key))),
                              ("stream", lambda: client.get(SSE.format(cid), headers=bearer(key)))):
            fault = proxy.cut_reply_after(lambda argv: argv[:2] == [b"EVAL", RATE_LIMIT_LUA.encode()])
            response = request()
            proxy.disarm()
            assert fault.applied == 1
            assert response.status_code == 503 and response.get_json()["error"] == "redis_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            # Run once, never sent again: the bucket holds one request (its TAT one interval ahead, at most).
            assert len([a for a in proxy.commands() if command_name(a) == b"EVAL"]) == 1
            proxy.clear_log()
            tat = int(redis_client.get(rate_limit_key(key_id(key), kind)))
            seconds, micros = redis_client.time()
            per_minute = POSTS_PER_MINUTE if kind == "post" else STREAMS_PER_MINUTE
            assert 0 < tat - (seconds * 1_000_000 + micros) <= interval_us(per_minute)
        assert store.get_conversation("alice", cid)["last_event_id"] == -1  # the post stored nothing
    finally:
        proxy.stop()


def test_a_signed_out_cookie_spends_nothing_of_its_keys_limit(app_with, redis_client):
    """A stolen cookie its victim signed out of: 401s that leave the victim's posts and opens their whole budget."""
    app = app_with(POST_RATE_LIMIT=5, STREAM_RATE_LIMIT=5)
    store = app.extensions["store"]
    key = store.create_api_key("alice")[1]
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository=None, branch=None, title="t", initial_user_msg=None)
    victim, attacker = app.test_client(use_cookies=False), app.test_client(use_cookies=False)
    line = victim.post("/api/session", headers=bearer(key)).headers["Set-Cookie"]
    cookie = {"Cookie": line.split(";", 1)[0]}
    assert victim.delete("/api/session", headers=cookie).status_code == 200
    for _ in range(6):
        assert attacker.post(f"/api/conversations/{cid}/events", json={"type": "x"}, headers=cookie).status_code == 401
        assert attacker.get(SSE.format(cid), headers=cookie).status_code == 401
    assert not redis_client.exists(rate_limit_key(key_id(key), "post"), rate_limit_key(key_id(key), "stream"))
    for _ in range(5):  # the victim's whole burst
        assert victim.post(f"/api/conversations/{cid}/events", json={"type": "x"}, headers=bearer(key)).status_code \
            == 200
    # A cookie of the key's current generation still spends the key's budget (the same bucket).
    fresh = {"Cookie": victim.post("/api/session", headers=bearer(key)).headers["Set-Cookie"].split(";", 1)[0]}
    assert victim.post(f"/api/conversations/{cid}/events", json={"type": "x"}, headers=fresh).status_code == 429


@pytest.mark.timeout(60)
def test_a_stream_open_redis_cannot_count_goes_on_uncounted_and_a_post_stays_503(tmp_path):
    """Out of memory (noeviction): the limiter's write is refused; stream opens, which only read, still open."""
    redis_server = RedisServer(tmp_path / "redis")
    # The per-user cap on, as by default: its lease script gets past maxmemory (its first write,
    # ZREMRANGEBYSCORE, is not refused for memory, and the rest of a script then is not either).
    server = Gunicorn(redis_server.start().url, POST_RATE_LIMIT="60", STREAM_RATE_LIMIT="30",
                      SSE_MAX_STREAMS_PER_USER="100")
    admin = redis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        server.start(tmp_path / "gunicorn.log")
        app = create_app({"REDIS_URL": redis_server.url, "TESTING": True})
        try:
            key = app.extensions["store"].create_api_key("alice")[1]
        finally:
            close(app.extensions["redis"])
        api = Api(server.base, key)
        cid = api.create(initial_user_msg="hello")
        admin.delete(rate_limit_key(key_id(key), "stream"), rate_limit_key(key_id(key), "post"))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # one byte: every write is refused, reads are not
        for _ in range(3):
            stream = open_stream(server.port, SSE.format(cid), bearer(key))
            assert stream.status == 200, stream.body
            assert [e.json()["type"] for e in stream.take(2)] == ["connection_established", "user_message"]
            stream.close()
        assert not admin.exists(rate_limit_key(key_id(key), "stream"))  # uncounted
        status, body, _ = api.call("POST", f"/api/conversations/{cid}/events", {"type": "x"})
        assert status == 503 and body["error"] == "redis_out_of_memory", body  # a post stays refused
        admin.config_set("maxmemory", "0")
        stream = open_stream(server.port, SSE.format(cid), bearer(key))
        assert stream.status == 200
        stream.close()
        assert admin.exists(rate_limit_key(key_id(key), "stream"))  # counted again
    finally:
        admin.close()
        server.stop()
        redis_server.stop()


@pytest.mark.timeout(60)
def test_the_limiter_on_a_read_only_replica_lets_a_stream_open_through_and_refuses_a_post(tmp_path):
    """READONLY (a demoted primary): -2 (uncounted, let through) for a stream open, the error for a post."""
    primary, replica = RedisServer(tmp_path / "primary"), RedisServer(tmp_path / "replica")
    clients = []
    try:
        clients.append(redis.Redis(port=primary.start().port, socket_timeout=5))
        clients.append(redis.Redis(port=replica.start().port, socket_timeout=5))
        clients[0].hset("apikey:{0123456789abcdef}", mapping={"user_id": "alice", "hash": "h"})
        clients[1].replicaof("127.0.0.1", primary.port)
        wait_until(lambda: clients[1].hget("apikey:{0123456789abcdef}", "user_id") == b"alice", 20,
                   what="the replica's copy of the key")
        keys = [rate_limit_key("0123456789abcdef", "stream"), "apikey:{0123456789abcdef}"]
        assert clients[1].eval(RATE_LIMIT_LUA, 2, *keys, interval_us(3), tolerance_us(3), "h", "", "1") == -2
        with pytest.raises(redis.ResponseError, match="READONLY|read only"):
            clients[1].eval(RATE_LIMIT_LUA, 2, *keys, interval_us(3), tolerance_us(3), "h", "", "")
    finally:
        for client in clients:
            client.close()
        replica.stop()
        primary.stop()


def test_gcra_in_redis(redis_client):
    """3 a minute: a burst of 3, then one every 20 s; a refusal writes nothing; the key goes once the bucket is full."""
    key, interval, tolerance = rate_limit_key("0123456789abcdef", "post"), interval_us(3), tolerance_us(3)
    assert (interval, tolerance) == (20_000_000, 40_000_000)

    def run(*record: str) -> int:
        keys = [key, *record[:1]]
        return redis_client.eval(RATE_LIMIT_LUA, len(keys), *keys, interval, tolerance, *(record[1:] or [""]))

    assert [run(), run(), run()] == [0, 0, 0]
    tat = redis_client.get(key)
    wait = run()
    assert 15_000_000 < wait <= interval  # almost an interval (the three took a moment)
    assert redis_client.get(key) == tat  # nothing written
    assert 55_000 < redis_client.pttl(key) <= 60_000  # full again in 3 intervals: gone then
    # One interval later (the TAT moved back by one): one more, then refused again.
    redis_client.set(key, int(tat) - interval, keepttl=True)
    assert run() == 0 and run() > 0
    # Long idle (a TAT in the past): a full burst again.
    redis_client.set(key, int(tat) - 10 * interval, keepttl=True)
    assert [run(), run(), run()] == [0, 0, 0] and run() > 0
    # With the API key's record: counted only for a live record and the right hash ('' is a cookie's: no hash).
    redis_client.delete(key)
    record = "apikey:{0123456789abcdef}"
    assert run(record, "h") == -1 and not redis_client.exists(key)  # no such key
    redis_client.hset(record, mapping={"user_id": "alice", "hash": "h"})
    assert run(record, "other") == -1 and not redis_client.exists(key)
    assert run(record, "h") == 0 and run(record, "") == 0
    # A cookie (ARGV[4]: its generation) counts only while its generation is the key's (absent: 0).
    redis_client.delete(key)
    assert run(record, "", "1") == -1 and not redis_client.exists(key)
    assert run(record, "", "0") == 0
    redis_client.hset(record, "cookie_gen", "1")
    assert run(record, "", "0") == -1 and run(record, "", "1") == 0 and run(record, "h") == 0
    redis_client.hset(record, "revoked_at", "now")
    assert run(record, "h") == -1 and run(record, "") == -1


def test_interval_tolerance_and_retry_after():
    assert interval_us(60) == 1_000_000 and tolerance_us(60) == 59_000_000
    assert interval_us(7) == 8_571_429  # rounded up: never more than 7 a minute
    assert tolerance_us(1) == 0  # a burst of one
    assert [retry_after(w) for w in (1, 999_999, 1_000_000, 1_000_001, 29_000_001)] == [1, 1, 1, 2, 30]


def test_settings():
    defaults = load_settings({})
    assert (defaults["POST_RATE_LIMIT"], defaults["STREAM_RATE_LIMIT"]) == (600, 300)
    # Two reopen waves a minute of a user holding the whole stream cap on one key get no 429.
    assert defaults["STREAM_RATE_LIMIT"] >= 2 * defaults["SSE_MAX_STREAMS_PER_USER"] + 50
    assert load_settings({"POST_RATE_LIMIT": "0"})["POST_RATE_LIMIT"] == 0
    for bad in ("-1", "ten", "1000001"):
        with pytest.raises(ConfigError, match="STREAM_RATE_LIMIT"):
            load_settings({"STREAM_RATE_LIMIT": bad})

