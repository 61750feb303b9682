"""Redis answers that mean "the store cannot take this now" are 503s with Retry-After and a code of their own."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from redis._parsers.base import BaseParser

from app import create_app, errors
from app.redis import close

from .conftest import assert_error, bearer, create
from .servers import RedisServer, free_port, wait_until

# Each test starts its own redis-server(s): bounded well below the suite's default.
pytestmark = pytest.mark.timeout(60)

SHA = "c455cd25f7c828fa2cead9eab114483065cb14bb"

# Words that would betray the store's insides if a message carried them.
INTERNALS = ("127.0.0.1", "localhost", "maxmemory", "user_script", SHA, "f_", "redis.call", "HINCRBY", "pipeline")


# Real servers -----------------------------------------------------------------------------------


@pytest.fixture()
def start_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start redis-servers of this test's own (the binary follows TEST_REDIS_SERVER); all stopped after it."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}")
        started.append(server)  # before start(): a server that never answers is stopped too
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture()
def admin() -> Iterator[Callable[[RedisServer], redis.Redis]]:
    """A plain client on one of those servers (to reconfigure it); all closed after the test."""
    opened: list[redis.Redis] = []

    def connect(server: RedisServer) -> redis.Redis:
        opened.append(redis.Redis(port=server.port, socket_timeout=5, decode_responses=True))
        return opened[-1]

    try:
        yield connect
    finally:
        for client in opened:
            client.close()


@pytest.fixture()
def make_app() -> Iterator[Callable[[RedisServer], Flask]]:
    """The app on one of those servers, defaults as in production; every pool disconnected after the test."""
    apps: list[Flask] = []

    def make(server: RedisServer) -> Flask:
        apps.append(create_app({"REDIS_URL": server.url, "REDIS_TIMEOUT_SECONDS": 2, "TESTING": True}))
        return apps[-1]

    try:
        yield make
    finally:
        for app in apps:
            close(app.extensions["redis"])


def seed(app: Flask) -> tuple[str, str]:
    """Alice's key and a conversation of hers, made while the store still works (scripts loaded, secret set)."""
    key = app.extensions["store"].create_api_key("alice")[1]
    return key, create(app.test_client(), key, initial_user_msg="hello")


def assert_503(response, code: str, server: RedisServer) -> None:
    """The store cannot take this now: 503, JSON of API.md, Retry-After, nothing of Redis's insides."""
    body = assert_error(response, 503, code)
    assert response.headers["Retry-After"] == "1"
    assert "retry" in body["message"].lower()
    for word in (*INTERNALS, str(server.port)):
        assert word.lower() not in body["message"].lower(), body


def post_conversation(client, key: str):
    """POST /api/conversations with a first message (so the append script runs too)."""
    return client.post("/api/conversations", json={"initial_user_msg": "hi"}, headers=bearer(key))


def post_event(client, key: str, cid: str):
    """POST an action to a conversation (the append script)."""
    return client.post(f"/api/conversations/{cid}/events", json={"type": "user_message", "content": "x"},
                       headers=bearer(key))


def assert_reads_work(client, key: str, cid: str) -> None:
    """The reads still answer from what is stored."""
    assert client.get("/api/conversations", headers=bearer(key)).status_code == 200
    assert client.get(f"/api/conversations/{cid}", headers=bearer(key)).get_json()["last_event_id"] == 0
    events = client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).get_json()["events"]
    assert [e["content"] for e in events] == ["hello"]


def test_out_of_memory_is_503_redis_out_of_memory(start_redis, admin, make_app):
    server = start_redis()
    app = make_app(server)
    key, cid = seed(app)
    store = admin(server)
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", "1")  # one byte: every write is refused, reads are not
    client = app.test_client()
    assert_503(post_conversation(client, key), "redis_out_of_memory", server)
    assert_503(post_event(client, key, cid), "redis_out_of_memory", server)
    assert_reads_work(client, key, cid)
    store.config_set("maxmemory", "0")
    assert post_event(client, key, cid).get_json()["event_id"] == 1  # nothing was half-written


def test_a_read_only_replica_is_503_redis_read_only_for_writes_and_serves_reads(start_redis, admin, make_app):
    primary, replica = start_redis(), start_redis()
    key, cid = seed(make_app(primary))
    admin(primary).config_set("repl-diskless-sync-delay", "0")  # Redis 7 otherwise waits 5 s for more replicas
    replica_admin = admin(replica)
    replica_admin.replicaof("127.0.0.1", primary.port)
    wait_until(lambda: replica_admin.info("replication").get("master_link_status") == "up", 20,
               what="the replica's link to its primary")
    client = make_app(replica).test_client()
    assert_503(post_conversation(client, key), "redis_read_only", replica)
    assert_503(post_event(client, key, cid), "redis_read_only", replica)
    assert_reads_work(client, key, cid)


def test_too_few_replicas_is_503_redis_no_replicas(start_redis, admin, make_app):
    server = start_redis()
    app = make_app(server)
    key, cid = seed(app)
    admin(server).config_set("min-replicas-to-write", "1")  # and there is none
    client = app.test_client()
    assert_503(post_conversation(client, key), "redis_no_replicas", server)
    assert_503(post_event(client, key, cid), "redis_no_replicas", server)
    assert_reads_work(client, key, cid)


def test_a_replica_cut_from_its_primary_is_503_redis_master_down_even_for_reads(start_redis, admin, make_app):
    server = start_redis()
    app = make_app(server)
    key, cid = seed(app)
    store = admin(server)
    store.config_set("replica-serve-stale-data", "no")
    store.replicaof("127.0.0.1", free_port())  # a primary nobody runs: the link stays down
    wait_until(lambda: store.info("replication").get("role") == "slave", 10, what="the replica role")
    client = app.test_client()
    for method, path, kwargs in [
        ("GET", "/api/conversations", {}),
        ("GET", f"/api/conversations/{cid}", {}),
        ("GET", f"/api/conversations/{cid}/events", {}),
        ("GET", f"/api/sse/conversations/{cid}/events", {}),
        ("POST", "/api/conversations", {"json": {"initial_user_msg": "hi"}}),
        ("POST", f"/api/conversations/{cid}/events", {"json": {"type": "user_message", "content": "x"}}),
        ("DELETE", f"/api/conversations/{cid}", {}),
    ]:
        assert_503(client.open(path, method=method, headers=bearer(key), **kwargs), "redis_master_down", server)


# The rest, from the replies Redis gives ---------------------------------------------------------

# (a Redis error reply, the machine code). redis-py turns the first word into a class when it knows it.
REPLIES = [
    ("OOM command not allowed when used memory > 'maxmemory'.", "redis_out_of_memory"),
    ("READONLY You can't write against a read only replica.", "redis_read_only"),
    ("LOADING Redis is loading the dataset in memory", "redis_loading"),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", "redis_master_down"),
    ("NOREPLICAS Not enough good replicas to write.", "redis_no_replicas"),
    ("CLUSTERDOWN The cluster is down", "redis_cluster_down"),
    ("CLUSTERDOWN Hash slot not served", "redis_cluster_down"),
    ("TRYAGAIN Multiple keys request during rehashing of slot", "redis_try_again"),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", "redis_busy"),
]


def parsed(reply: str) -> redis.RedisError:
    """The exception redis-py raises for this error reply."""
    return BaseParser.parse_error(reply)


def in_pipeline(err: redis.RedisError, *command: str) -> redis.RedisError:
    """The same error as a pipeline raises it: redis-py prefixes the message with the command."""
    redis.Redis().pipeline().annotate_exception(err, 2, command or ("EVALSHA", SHA, "1", "k", "x"))
    return err


# How each reply reaches us: as is; from EVALSHA on Redis 6.2 (its own checks write "-CODE", a
# failing command's reply has no dash); from EVALSHA on Redis 7; inside a pipeline.
FORMS: dict[str, Callable[[str], redis.RedisError]] = {
    "plain": parsed,
    "script-6.2-check": lambda r: parsed(f"ERR Error running script (call to f_{SHA}): @user_script:5: "
                                         f"@user_script: 5: -{r}"),
    "script-6.2-reply": lambda r: parsed(f"ERR Error running script (call to f_{SHA}): @user_script:5: {r}"),
    "script-7": lambda r: parsed(f"{r} script: {SHA}, on @user_script:5."),
    "pipeline": lambda r: in_pipeline(parsed(r)),
    "pipeline-script-6.2": lambda r: in_pipeline(parsed(f"ERR Error running script (call to f_{SHA}): "
                                                        f"@user_script:5: @user_script: 5: -{r}")),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("reply", "code"), REPLIES)
def test_unavailable_replies_are_classified_in_every_form(reply, code, form):
    answer = errors.redis_unavailable(FORMS[form](reply))
    assert answer is not None and answer[0] == code
    message = answer[1]
    assert "retry" in message.lower()
    for word in (*INTERNALS, reply.split(" ", 1)[1][:20]):
        assert word.lower() not in message.lower()


@pytest.mark.parametrize("err", [
    redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    parsed("ERR max number of clients reached"),
])
def test_connection_failures_stay_redis_unavailable(err):
    code, message = errors.redis_unavailable(err)
    assert code == "redis_unavailable"
    assert "127.0.0.1" not in message and "retry" in message.lower()


def test_every_code_has_a_message_of_its_own():
    answers = [errors.redis_unavailable(parsed(reply)) for reply, _code in REPLIES]
    answers.append(errors.redis_unavailable(redis.exceptions.ConnectionError("down")))
    assert len({code for code, _ in answers}) == len({message for _, message in answers}) == 9


@pytest.mark.parametrize("err", [
    parsed("WRONGTYPE Operation against a key holding the wrong kind of value"),
    parsed("ERR syntax error"),
    parsed("NOSCRIPT No matching script. Please use EVAL."),
    parsed("BUSYKEY Target key name already exists."),
    parsed("EXECABORT Transaction discarded because of previous errors."),
    parsed("NOPERM this user has no permissions to run the 'evalsha' command"),
    parsed("ERR unknown command 'OOM', with args beginning with: 'BUSY' "),
    parsed(f"ERR Error running script (call to f_{SHA}): @user_script:5: "
           "WRONGTYPE Operation against a key holding the wrong kind of value"),
    parsed(f"WRONGTYPE Operation against a key holding the wrong kind of value script: {SHA}, on @user_script:5."),
    parsed(f"ERR Error running script (call to f_{SHA}): @user_script:1: Script killed by user with SCRIPT KILL..."),
    parsed(f"ERR Error running script (call to f_{SHA}): @user_script:3: user_script:3: Script attempted to "
           "access nonexistent global variable 'BUSY'"),
    # What a client posted must not make a real error look like an outage.
    in_pipeline(parsed("WRONGTYPE Operation against a key holding the wrong kind of value"),
                "EVALSHA", SHA, "3", "k", '"content":"x) of pipeline caused error: OOM command not allowed'),
    redis.exceptions.ResponseError(""),
    redis.exceptions.DataError("Invalid input of type: 'NoneType'"),
    ValueError("OOM"),
])
def test_other_errors_are_not_unavailable(err):
    assert errors.redis_unavailable(err) is None


# Through the app: every code is a 503 with Retry-After ------------------------------------------


@pytest.mark.parametrize(("reply", "code"), REPLIES)
def test_the_handler_answers_503_with_the_code(app, client, key, reply, code, caplog):
    @app.get("/api/unavailable")
    def unavailable():
        raise FORMS["script-6.2-check"](reply)

    response = client.get("/api/unavailable", headers=bearer(key))
    body = assert_error(response, 503, code)
    assert response.headers["Retry-After"] == "1"
    for word in INTERNALS:
        assert word.lower() not in body["message"].lower()
    assert not any(r.exc_info for r in caplog.records)  # expected, so a warning without a traceback


@pytest.mark.parametrize("err", [
    redis.exceptions.ClusterError("TTL exhausted."),  # redirections (TRYAGAIN while a slot migrates) went on too long
    redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
])
def test_a_slot_being_moved_is_redis_try_again(err):
    code, message = errors.redis_unavailable(err)
    assert code == "redis_try_again" and "retry" in message.lower()
