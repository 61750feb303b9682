"""The service on a Sentinel-managed master (`redis+sentinel://`): REST, streams, idempotency, the CLI, WAIT."""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator

import pytest

from app import create_app
from app.redis import close

from .conftest import Api, bearer
from .failover import Follower, post_with_retries
from .servers import ROOT, VENV_BIN, wait_until
from .sse_client import open_stream
from .topologies import Sentinel3, sentinel  # noqa: F401

SSE = "/api/sse/conversations/{}/events"


@pytest.fixture()
def sentinel_app(sentinel: Sentinel3) -> Iterator:  # noqa: F811
    """The app in this process on the sentinel's master (for keys and direct checks)."""
    app = create_app({"REDIS_URL": sentinel.url, "TESTING": True})
    yield app
    close(app.extensions["redis"])


def test_rest_streams_and_idempotency_work_through_the_sentinels(sentinel: Sentinel3, sentinel_app,  # noqa: F811
                                                                  start_server):
    key = sentinel_app.extensions["store"].create_api_key("sam")[1]
    server = start_server(redis_url=sentinel.url, REDIS_MIN_REPLICAS_ACK="1")
    api = Api(server.base, key)
    cid = api.create(initial_user_msg="hello")
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.status == 200
    got = stream.take(2)
    assert got[0].event == "connection" and got[1].id == "0"
    status, first, _ = api.call("POST", f"/api/conversations/{cid}/events", {"type": "user_message", "content": "a"},
                                {"Idempotency-Key": "k1"})
    status_again, again, _ = api.call("POST", f"/api/conversations/{cid}/events",
                                      {"type": "user_message", "content": "a"}, {"Idempotency-Key": "k1"})
    assert status == status_again == 200 and first == again == {"status": "ok", "success": True, "event_id": 1}
    assert [ev.id for ev in stream.take(1)] == ["1"]
    # Acknowledged with REDIS_MIN_REPLICAS_ACK=1: the replica has it.
    replica = sentinel.replica_client()
    assert replica.xlen(f"conv:{{{cid}}}:events") == 2
    replica.close()
    assert api.call("DELETE", f"/api/conversations/{cid}")[0] == 200
    assert stream.ended(3)


def test_waiting_for_more_replicas_than_there_are_answers_503_and_a_retry_stores_nothing_more(
        sentinel: Sentinel3, sentinel_app, start_server):  # noqa: F811
    key = sentinel_app.extensions["store"].create_api_key("sam")[1]
    server = start_server(redis_url=sentinel.url, REDIS_MIN_REPLICAS_ACK="2", REDIS_REPLICAS_ACK_TIMEOUT_MS="200")
    api = Api(server.base, key)
    cid = sentinel_app.extensions["store"].new_conversation_id()
    sentinel_app.extensions["store"].create_conversation("sam", cid, repository=None, branch=None, title="t",
                                                          initial_user_msg=None)
    body, headers = {"type": "user_message", "content": "a"}, {"Idempotency-Key": "k2"}
    status, answer, response_headers = api.call("POST", f"/api/conversations/{cid}/events", body, headers)
    assert status == 503 and answer["error"] == "redis_not_replicated" and response_headers["Retry-After"] == "1"
    status, answer, _ = api.call("POST", f"/api/conversations/{cid}/events", body, headers)
    assert status == 503  # still one replica: but the event was stored once, not twice
    master = sentinel.client()
    assert master.xlen(f"conv:{{{cid}}}:events") == 1
    master.close()


def test_the_cli_creates_keys_through_the_sentinels(sentinel: Sentinel3, sentinel_app):  # noqa: F811
    out = subprocess.run([str(VENV_BIN / "flask"), "--app", "wsgi", "keys", "create", "cli-user"], cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "REDIS_URL": sentinel.url}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    client = sentinel_app.test_client()
    assert client.get("/api/conversations", headers=bearer(key)).status_code == 200


@pytest.mark.timeout(300)
def test_a_failover_loses_no_acknowledged_event_and_streams_resume_by_themselves(tmp_path, start_server):
    topology = Sentinel3(tmp_path / "sentinel").start()
    app = create_app({"REDIS_URL": topology.url, "TESTING": True})
    readers: list[Follower] = []
    try:
        store = app.extensions["store"]
        key = store.create_api_key("sam")[1]
        cid = store.new_conversation_id()
        store.create_conversation("sam", cid, repository=None, branch=None, title="t", initial_user_msg=None)
        server = start_server(redis_url=topology.url, REDIS_MIN_REPLICAS_ACK="1", REDIS_REPLICAS_ACK_TIMEOUT_MS="500",
                              REDIS_TIMEOUT_SECONDS="1", SSE_MAX_STREAMS_PER_USER="0")
        total, before_kill = 40, 15
        readers.extend(Follower(server.port, cid, key) for _ in range(10))
        acked: dict[int, int] = {}
        refused: list[tuple[float, int, str]] = []
        poster = threading.Thread(target=post_with_retries, args=(Api(server.base, key), cid, total, acked, refused))
        poster.start()
        wait_until(lambda: len(acked) >= before_kill, 30, what="posts before the failover")
        old = topology.kill_master()
        topology.wait_failover(old)
        topology.restart(old)  # back as a replica, so that WAIT 1 can be met again
        topology.wait_replicas(1)
        poster.join(160)
        # What the posts were answered while they were refused, last ones first: for a failure's story.
        assert not poster.is_alive() and len(acked) == total, (len(acked), refused[-12:][::-1])
        assert sorted(acked.values()) == list(range(total))  # every post stored once, none lost
        for reader in readers:
            wait_until(lambda r=reader: len(r.ids) >= total or r.error, 30, what="every event on every stream")
        for reader in readers:
            reader.stop()
            assert reader.error is None and reader.ids == list(range(total)), (reader.ids, reader.error)
        listed = Api(server.base, key).call("GET", f"/api/conversations/{cid}/events?limit=1000")[1]["events"]
        assert sorted(e["content"] for e in listed) == sorted(f"m{i}" for i in range(total))
        assert all(e["content"] == f"m{i}" for i, n in acked.items() for e in listed if e["id"] == n)
    finally:
        for reader in readers:
            reader.stop()
        close(app.extensions["redis"])
        topology.stop()
