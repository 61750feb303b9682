"""Nothing of a conversation outlives it: deletion removes every key, a create cut off is invisible and expires."""
from __future__ import annotations

import pytest

from app import create_app
from app.redis import close
from app.store import (
    CREATE_PENDING_TTL,
    conv_events_key,
    conv_inbox_key,
    conv_meta_key,
    user_conversations_key,
    user_sequence_key,
)

from .conftest import assert_error, bearer, create
from .servers import wait_until


def keys_of(redis_client, cid: str) -> list[bytes]:
    """Every key whose name holds the conversation id (SCAN, as an operator would look)."""
    return sorted(redis_client.scan_iter(match=f"*{cid}*", count=1000))


def test_delete_leaves_no_key_of_the_conversation(client, key, redis_client):
    cid = create(client, key, initial_user_msg="hello")
    for n in range(3):
        headers = {**bearer(key), "Idempotency-Key": f"k{n}"}
        response = client.post(f"/api/conversations/{cid}/events", headers=headers,
                               json={"type": "user_message", "content": f"m{n}"})
        assert response.status_code == 200
    # meta, events, the remembered answers and their expiry, the agent inbox (no agent runs here)
    assert len(keys_of(redis_client, cid)) == 5
    assert client.delete(f"/api/conversations/{cid}", headers=bearer(key)).status_code == 200
    assert keys_of(redis_client, cid) == []
    assert redis_client.zscore(user_conversations_key("alice"), cid) is None
    assert_error(client.delete(f"/api/conversations/{cid}", headers=bearer(key)), 404, "not_found")


@pytest.fixture()
def short_memory(redis_server, redis_client):
    """The app remembering Idempotency-Keys for 1 s."""
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "IDEMPOTENCY_TTL_SECONDS": 1})
    yield app
    close(app.extensions["redis"])


def test_remembered_answers_expire_with_their_ttl_and_take_their_keys_along(short_memory, redis_client):
    client = short_memory.test_client()
    key = short_memory.extensions["store"].create_api_key("alice")[1]
    cid = create(client, key)
    headers = {**bearer(key), "Idempotency-Key": "once"}
    post = lambda: client.post(f"/api/conversations/{cid}/events", headers=headers,  # noqa: E731
                               json={"type": "user_message", "content": "hi"}).get_json()["event_id"]
    assert post() == 0 and post() == 0  # remembered
    assert 0 < redis_client.pttl(f"conv:{{{cid}}}:idem") <= 1000  # it expires on a whole second: 0 to 1 s
    # Once it expired the key is a new request, and an idle conversation keeps no record at all.
    # (meta, events and the agent inbox stay; no agent runs here to answer the message)
    wait_until(lambda: len(keys_of(redis_client, cid)) == 3, 5, what="the records to expire")
    assert post() == 1


def test_a_create_cut_off_before_its_commit_is_invisible_and_expires(app, client, key, redis_client):
    store = app.extensions["store"]
    cid = store.new_conversation_id()
    first = store._event_json({"type": "user_message", "content": "lost"}, "user")
    keys = [conv_meta_key(cid), conv_events_key(cid), conv_inbox_key(cid)]
    # Steps 1 and 2 of a create ran; the process died before step 3.
    store._create(keys=keys, args=[CREATE_PENDING_TTL, first[1:], "owner", "alice", "title", "t",
                                   "created_at", "now", "last_event_id", -1])
    store._index(keys=[user_sequence_key("alice"), user_conversations_key("alice")], args=[cid])
    visible = create(client, key)
    assert [c["conversation_id"] for c in client.get("/api/conversations", headers=bearer(key)).get_json()["results"]] \
        == [visible]
    for method, path, body in (
        ("GET", f"/api/conversations/{cid}", None),
        ("GET", f"/api/conversations/{cid}/events", None),
        ("POST", f"/api/conversations/{cid}/events", {"type": "user_message", "content": "x"}),
        ("GET", f"/api/sse/conversations/{cid}/events", None),
    ):
        assert_error(client.open(path, method=method, json=body, headers=bearer(key)), 404, "not_found")
    for name in keys:
        assert 0 < redis_client.ttl(name) <= CREATE_PENDING_TTL  # it goes by itself
    assert redis_client.zscore(user_conversations_key("alice"), cid) is not None  # a listing leaves it meanwhile
    redis_client.delete(*keys)  # as its TTL will
    client.get("/api/conversations", headers=bearer(key))
    assert redis_client.zscore(user_conversations_key("alice"), cid) is None  # the next listing drops the entry
    assert keys_of(redis_client, cid) == []


def test_each_step_of_a_create_is_safe_to_run_twice(app, client, key, redis_client):
    """What a lost reply re-sent by a caller would do: the same conversation, one event 0, one index entry."""
    store = app.extensions["store"]
    cid = store.new_conversation_id()
    for _ in range(2):
        store.create_conversation("alice", cid, repository="o/r", branch=None, title="t", initial_user_msg="hi")
    body = client.get(f"/api/conversations/{cid}", headers=bearer(key)).get_json()
    assert body["last_event_id"] == 0
    assert redis_client.xlen(conv_events_key(cid)) == 1
    assert redis_client.zcard(user_conversations_key("alice")) == 1
    assert redis_client.ttl(conv_meta_key(cid)) == -1 and redis_client.ttl(conv_events_key(cid)) == -1
