"""The service on a Sentinel-managed master (`redis+sentinel://`): REST, streams, idempotency, the CLI, WAIT."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from app import create_app

from .conftest import Api, bearer
from .servers import ROOT, VENV_BIN
from .sse_client import open_stream
from .topologies import Sentinel3, sentinel  # noqa: F401

SSE = "/api/sse/conversations/{}/events"


@pytest.fixture()
def sentinel_app(sentinel: Sentinel3) -> Iterator:  # noqa: F811
    """The app in this process on the sentinel's master (for keys and direct checks)."""
    app = create_app({"REDIS_URL": sentinel.url, "TESTING": True})
    yield app
    app.extensions["redis"].connection_pool.disconnect()


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
