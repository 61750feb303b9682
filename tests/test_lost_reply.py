"""Lost and late Redis replies (issue 6, item 1): a write whose reply never comes is never run twice.

When Redis runs a write but its reply is lost (the connection is cut) or comes after the socket
timeout, the client cannot know whether the write ran. Re-sending it blindly (redis-py's
``Retry``) runs it twice. These tests put tests/faultproxy.py between a real gunicorn (gevent
workers) and a real Redis, lose or delay the reply of each write path's command, and check what
the client was told against what Redis holds:

- a ``200`` means the write happened exactly once;
- a ``503`` (JSON error with ``Retry-After``) means it happened once or not at all, and what is
  visible through the API is whole (a conversation is complete, or not there);
- never a ``500``, never a second copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import create_app, lua
from app.redis import close

from .conftest import Api, bearer
from .faultproxy import Argv, Fault, FaultProxy, command_name, describe
from .servers import ROOT, VENV_BIN

REDIS_TIMEOUT = 0.5  # the app's REDIS_TIMEOUT_SECONDS in these tests
SLOW = 1.5  # how late a slow reply comes: well past REDIS_TIMEOUT (and past one retry of it)

# Which Redis commands each path sends -------------------------------------------------------------
# Everything the tests know about app/store.py's commands is here. A predicate takes a command's
# argv (bytes) and says whether it is the write to lose. They match by the keys a write touches,
# not by script SHA1 or command name, so a renamed or split script still matches.

READ_ONLY = frozenset({
    b"PING", b"ECHO", b"HELLO", b"AUTH", b"SELECT", b"CLIENT", b"INFO", b"SCRIPT", b"FUNCTION", b"COMMAND",
    b"GET", b"MGET", b"EXISTS", b"TYPE", b"TTL", b"PTTL", b"SCAN", b"HGET", b"HMGET", b"HGETALL", b"HEXISTS",
    b"HLEN", b"SMEMBERS", b"SISMEMBER", b"SCARD", b"ZRANGE", b"ZREVRANGE", b"ZRANGEBYSCORE", b"ZREVRANGEBYSCORE",
    b"ZSCORE", b"ZCARD", b"XRANGE", b"XREVRANGE", b"XREAD", b"XLEN", b"XINFO", b"EVAL_RO", b"EVALSHA_RO",
    b"FCALL_RO",
})


def conv_key(cid: str, part: str) -> bytes:
    """A key of one conversation (app/store.py: conv:{<id>}:<part>)."""
    return f"conv:{{{cid}}}:{part}".encode()


def any_conv_key(part: str) -> Callable[[bytes], bool]:
    """Matches that key of any conversation (for a create, whose id the server picks)."""
    suffix = f"}}:{part}".encode()
    return lambda arg: arg.startswith(b"conv:{") and arg.endswith(suffix)


def user_key(uid: str, part: str) -> bytes:
    """A key of one user (app/store.py: user:{<id>}:<part>)."""
    return f"user:{{{uid}}}:{part}".encode()


def writes(touches: Callable[[bytes], bool], *also: bytes) -> Callable[[Argv], bool]:
    """A write (not a read-only command) naming a key `touches` accepts (and every arg in `also`)."""
    def predicate(argv: Argv) -> bool:
        args = argv[1:]
        return (command_name(argv) not in READ_ONLY and any(touches(a) for a in args)
                and all(x in args for x in also))
    return predicate


def exactly(key: bytes) -> Callable[[bytes], bool]:
    """Matches one key name."""
    return lambda arg: arg == key


def append_of(cid: str) -> Callable[[Argv], bool]:
    """The append of an event to `cid` (today: EVALSHA of APPEND_LUA with the events key in KEYS)."""
    return writes(exactly(conv_key(cid, "events")))


def script(source: str) -> Callable[[Argv], bool]:
    """A run of this script of app/store.py (EVALSHA of its SHA1)."""
    sha = hashlib.sha1(source.encode()).hexdigest().encode()
    return lambda argv: command_name(argv) == b"EVALSHA" and len(argv) > 1 and argv[1].lower() == sha


# A create: three steps (the conversation, made invisible and expiring, with event 0; the owner's
# index; the commit that makes it visible). Each step is the first write that touches that part;
# the proxy forwards nothing after it on that connection.
CREATE_STEPS: dict[str, Callable[[Argv], bool]] = {
    "meta": writes(any_conv_key("meta")),
    "index": writes(exactly(user_key("alice", "convs"))),
    "event0": writes(any_conv_key("events")),
    "commit": script(lua.COMMIT_LUA),
}

# A delete (today: EVALSHA of DELETE_LUA on meta + events, then ZREM from the owner's index).
DELETE_STEPS: dict[str, Callable[[str], Callable[[Argv], bool]]] = {
    "conversation": lambda cid: writes(exactly(conv_key(cid, "meta"))),
    "index": lambda cid: writes(exactly(user_key("alice", "convs")), cid.encode()),
}

# An API key (today one pipeline: HSET apikey:{id}, SADD user:{uid}:keys).
KEY_STEPS: dict[str, Callable[[Argv], bool]] = {
    "record": writes(lambda arg: arg.startswith(b"apikey:{")),
    "index": writes(exactly(user_key("alice", "keys"))),
}

# How a reply goes wrong: lost (connection cut after Redis ran the command) or late (past the
# socket timeout), for the first attempt only or for every attempt until the request is answered.
FAULTS: dict[str, Callable[[FaultProxy, Callable[[Argv], bool]], Fault]] = {
    "lost-once": lambda proxy, pred: proxy.cut_reply_after(pred, count=1),
    "lost-always": lambda proxy, pred: proxy.cut_reply_after(pred, count=None),
    "slow-once": lambda proxy, pred: proxy.delay_reply(pred, SLOW, count=1),
    "slow-always": lambda proxy, pred: proxy.delay_reply(pred, SLOW, count=None),
}


# Fixtures and helpers -----------------------------------------------------------------------------

@pytest.fixture()
def proxy(redis_server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the tests' Redis; stopped (thread joined) after the test."""
    proxy = FaultProxy("127.0.0.1", redis_server.port).start()
    yield proxy
    proxy.stop()
    assert not proxy.errors, proxy.errors


@pytest.fixture()
def server(proxy, start_server):
    """A gunicorn (one gevent worker) whose Redis is the proxy, with a short Redis timeout."""
    return start_server(redis_url=proxy.url, REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT))


@pytest.fixture()
def api(server, make_key) -> Api:
    """Alice's client of that server."""
    return Api(server.base, make_key("alice"))


def fault_fired(fault: Fault, proxy: FaultProxy) -> None:
    """Disarm the proxy and check that the fault really hit a command (else the test proves nothing)."""
    proxy.disarm()
    assert fault.hits >= 1 and fault.applied >= 1, (
        "the fault never fired: adapt the predicates at the top of tests/test_lost_reply.py to app/store.py; "
        f"writes seen: {[describe(a) for a in proxy.commands() if command_name(a) not in READ_ONLY]}")


def lost_writes(fault: Fault) -> str:
    """The commands whose replies the fault lost or delayed, for messages."""
    return "; ".join(describe(a, 90) for a in fault.matched)


def assert_unavailable(status: int, body: object, headers: dict[str, str]) -> None:
    """The 503 of API.md: the JSON error body and a Retry-After."""
    assert status == 503, (status, body)
    assert isinstance(body, dict) and set(body) == {"status", "error", "message"} and body["status"] == "error", body
    assert any(k.lower() == "retry-after" for k in headers), headers
    assert "Traceback" not in json.dumps(body)


def stored(redis_client: redis.Redis, cid: str) -> list[dict]:
    """The events Redis holds for `cid` (XRANGE of its stream)."""
    return [json.loads(fields[b"e"]) for _id, fields in redis_client.xrange(conv_key(cid, "events"))]


def listed_events(api: Api, cid: str) -> list[dict]:
    """The events the REST listing shows."""
    status, body, _ = api.call("GET", f"/api/conversations/{cid}/events?limit=1000")
    assert status == 200, body
    return body["events"]


def listed_conversations(api: Api) -> list[str]:
    """Ids of the caller's conversations as the listing shows them."""
    status, body, _ = api.call("GET", "/api/conversations?limit=100")
    assert status == 200, body
    return [c["conversation_id"] for c in body["results"]]


def assert_consistent(api: Api, redis_client: redis.Redis, cid: str) -> list[dict]:
    """Listing, Redis and last_event_id agree, ids are 0..n-1; the events."""
    events = listed_events(api, cid)
    assert events == stored(redis_client, cid)
    assert [e["id"] for e in events] == list(range(len(events)))
    status, conv, _ = api.call("GET", f"/api/conversations/{cid}")
    assert status == 200, conv
    assert conv["last_event_id"] == len(events) - 1, (conv, events)
    return events


def warm_up(api: Api) -> str:
    """Run every script once (a first EVALSHA is a NOSCRIPT, not a write) and open pooled connections."""
    cid = api.create(initial_user_msg="warm-up")
    api.post(cid, type="user_message", content="warm-up")
    return cid


def post_action(api: Api, cid: str, content: str, headers: dict[str, str] | None = None):
    """POST a user_message; (status, body, headers)."""
    return api.call("POST", f"/api/conversations/{cid}/events", {"type": "user_message", "content": content}, headers)


# Appending an event -------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_post_without_idempotency_key_is_stored_at_most_once(fault, api, proxy, redis_client):
    cid = api.create(initial_user_msg="hello")
    api.post(cid, type="user_message", content="warm-up")
    armed = FAULTS[fault](proxy, append_of(cid))
    status, body, headers = post_action(api, cid, "once")
    fault_fired(armed, proxy)
    copies = [e for e in stored(redis_client, cid) if e.get("content") == "once"]
    ids = [e["id"] for e in copies]
    assert status != 500, f"a lost reply of {lost_writes(armed)} answered 500: {body}"
    if status == 200:
        assert len(copies) == 1, f"answered 200 (event_id {body['event_id']}) but stored {len(copies)} times: ids {ids}"
        assert body["event_id"] == copies[0]["id"]
    else:
        assert_unavailable(status, body, headers)
        assert len(copies) <= 1, f"answered 503 but stored {len(copies)} times: ids {ids}"
    assert_consistent(api, redis_client, cid)


@pytest.mark.parametrize("fault", FAULTS)
def test_post_with_idempotency_key_is_stored_once_across_retries(fault, api, proxy, redis_client):
    cid = api.create(initial_user_msg="hello")
    api.post(cid, type="user_message", content="warm-up")
    key = {"Idempotency-Key": f"lost-reply-{fault}"}
    armed = FAULTS[fault](proxy, append_of(cid))
    first = post_action(api, cid, "once", key)
    fault_fired(armed, proxy)
    assert first[0] != 500, f"a lost reply of {lost_writes(armed)} answered 500: {first[1]}"
    if first[0] != 200:
        assert_unavailable(*first)
    status, body, _ = post_action(api, cid, "once", key)  # the client's retry, same key and body
    assert status == 200, body
    copies = [e for e in stored(redis_client, cid) if e.get("content") == "once"]
    assert len(copies) == 1, f"stored {len(copies)} times: ids {[e['id'] for e in copies]}"
    assert body["event_id"] == copies[0]["id"]
    if first[0] == 200:
        assert first[1]["event_id"] == body["event_id"]
    assert_consistent(api, redis_client, cid)


# Creating a conversation --------------------------------------------------------------------------

def assert_complete(api: Api, redis_client: redis.Redis, cid: str) -> None:
    """A created conversation with its initial message: last_event_id 0, exactly that one event."""
    events = assert_consistent(api, redis_client, cid)
    shown = [(e["id"], e["type"], e["source"], e.get("content")) for e in events]
    assert shown == [(0, "user_message", "user", "hello")], f"conversation {cid} is visible but not whole: {events}"


def assert_no_orphans(api: Api, redis_client: redis.Redis, ignore: set[str]) -> None:
    """Every conv:* key left belongs to a conversation the API shows in full, or expires by itself."""
    listed = set(listed_conversations(api))
    by_cid: dict[str, list[bytes]] = {}
    for key in redis_client.scan_iter(match="conv:*"):
        cid = key.split(b"{", 1)[1].split(b"}", 1)[0].decode()
        if cid not in ignore:
            by_cid.setdefault(cid, []).append(key)
    for cid, keys in by_cid.items():
        status, conv, _ = api.call("GET", f"/api/conversations/{cid}")
        if status == 200:
            assert cid in listed, f"GET shows {conv} but the listing does not (keys {keys})"
            assert_complete(api, redis_client, cid)
        else:
            assert status == 404, (status, conv)
            lasting = [k for k in keys if redis_client.ttl(k) < 0]
            assert not lasting, f"keys of an invisible conversation that never expire: {lasting}"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_is_complete_or_invisible(step, fault, api, proxy, redis_client, make_key):
    bob = Api(api.base, make_key("bob"))
    ignore = {warm_up(bob)}  # scripts loaded; bob's conversation is not under test
    armed = FAULTS[fault](proxy, CREATE_STEPS[step])
    status, body, headers = api.call("POST", "/api/conversations", {"initial_user_msg": "hello"})
    fault_fired(armed, proxy)
    assert status != 500, f"a lost reply of {lost_writes(armed)} answered 500: {body}"
    listed = listed_conversations(api)
    if status == 200:
        assert listed == [body["conversation_id"]]
        assert_complete(api, redis_client, body["conversation_id"])
    else:
        assert_unavailable(status, body, headers)
        # The client never learned an id: nothing may be visible, or its retry would make two.
        assert listed == [], listed
    assert_no_orphans(api, redis_client, ignore)


# Deleting a conversation --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_leaves_nothing(step, fault, api, proxy, redis_client):
    throwaway = warm_up(api)
    assert api.call("DELETE", f"/api/conversations/{throwaway}")[0] == 200  # the delete script is loaded
    cid = api.create(initial_user_msg="hello")
    api.post(cid, type="user_message", content="more")
    armed = FAULTS[fault](proxy, DELETE_STEPS[step](cid))
    status, body, headers = api.call("DELETE", f"/api/conversations/{cid}")
    fault_fired(armed, proxy)
    assert status in (200, 404, 503), f"a lost reply of {lost_writes(armed)} answered {status}: {body}"
    if status == 503:
        assert_unavailable(status, body, headers)
        status, body, _ = api.call("DELETE", f"/api/conversations/{cid}")
        assert status in (200, 404), (status, body)
    assert api.call("GET", f"/api/conversations/{cid}")[0] == 404
    assert cid not in listed_conversations(api)
    assert list(redis_client.scan_iter(match=f"*{cid}*")) == []


# Creating an API key ------------------------------------------------------------------------------

def alice_key_records(redis_client: redis.Redis) -> list[bytes]:
    """The apikey:* records that belong to alice."""
    return [k for k in redis_client.scan_iter(match="apikey:*") if redis_client.hget(k, "user_id") == b"alice"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("step", KEY_STEPS)
def test_create_api_key_returns_a_working_key_or_raises(step, fault, proxy, redis_client, client):
    proxied = create_app({"REDIS_URL": proxy.url, "TESTING": True, "REDIS_TIMEOUT_SECONDS": REDIS_TIMEOUT})
    try:
        store = proxied.extensions["store"]
        store.redis.ping()
        armed = FAULTS[fault](proxy, KEY_STEPS[step])
        try:
            created = store.create_api_key("alice")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            created = None
        fault_fired(armed, proxy)
    finally:
        close(proxied.extensions["redis"])
    records = alice_key_records(redis_client)
    assert len(records) <= 1, f"one create_api_key left {len(records)} records: {records}"
    if created is not None:
        key_id, key = created
        assert records == [f"apikey:{{{key_id}}}".encode()]
        response = client.get("/api/conversations", headers=bearer(key))
        assert response.status_code == 200, response.data


@pytest.mark.parametrize("fault", FAULTS)
def test_cli_keys_create_fails_cleanly_when_its_write_is_lost(fault, proxy, redis_client, client):
    armed = FAULTS[fault](proxy, KEY_STEPS["record"])
    env = {**os.environ, "REDIS_URL": proxy.url, "REDIS_TIMEOUT_SECONDS": str(REDIS_TIMEOUT)}
    run = subprocess.run([str(VENV_BIN / "flask"), "--app", "wsgi", "keys", "create", "alice"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    fault_fired(armed, proxy)
    output = run.stdout + run.stderr
    assert "Traceback" not in output and 'File "' not in output, (
        f"`keys create` printed a traceback (exit {run.returncode}) when {lost_writes(armed)} lost its reply:\n"
        + output[-1500:])
    records = alice_key_records(redis_client)
    assert len(records) <= 1, records
    if run.returncode == 0:  # a retry that is safe may succeed: then the key it printed works
        assert not fault.endswith("always"), f"every attempt was lost, yet it exited 0: {output}"
        key = run.stdout.strip().splitlines()[-1]
        response = client.get("/api/conversations", headers=bearer(key))
        assert response.status_code == 200, response.data
    else:
        assert "ohk_" not in output, output  # no key is shown that may not exist
        assert run.stderr.strip().startswith("Error:") and "Redis" in run.stderr, run.stderr


# The proxy itself: the tests above prove nothing if it does not do what it says ---------------------

def _client(url: str) -> redis.Redis:
    """A client that never retries, on the given URL."""
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                retry=Retry(NoBackoff(), 0))


def test_proxy_cuts_only_that_connection_and_forwards_nothing_after_the_lost_command(proxy, redis_client):
    other, victim = _client(proxy.url), _client(proxy.url)
    try:
        assert other.ping() and victim.ping()
        armed = proxy.cut_reply_after(lambda argv: argv[:2] == [b"INCRBY", b"b"])
        pipe = victim.pipeline(transaction=False)
        pipe.incr("a")
        pipe.incr("b")
        pipe.incr("c")
        with pytest.raises(redis.exceptions.ConnectionError):
            pipe.execute()
        assert armed.wait(5) and armed.hits == 1
        assert redis_client.mget("a", "b", "c") == [b"1", b"1", None]  # ran up to the lost one, not after
        assert other.incr("b") == 2  # the other connection never noticed
        assert victim.incr("b") == 3  # a new connection is not cut: the fault fired once
    finally:
        other.close()
        victim.close()


def test_proxy_delays_a_reply_past_the_timeout_and_keeps_others_fast(proxy, redis_client):
    slow, fast = _client(proxy.url), _client(proxy.url)
    try:
        armed = proxy.delay_reply(lambda argv: argv[:2] == [b"INCRBY", b"slow"], SLOW)
        with pytest.raises(redis.exceptions.TimeoutError):
            slow.incr("slow")
        assert armed.wait(5)
        assert redis_client.get("slow") == b"1"  # Redis ran it; only the reply was late
        assert fast.incr("fast") == 1
        assert slow.incr("slow") == 2
    finally:
        slow.close()
        fast.close()
