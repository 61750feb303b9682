"""Events over REST: posting actions, listing them, body limits, idempotency, concurrency, retention."""
from __future__ import annotations

import io
import json
import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from app import create_app
from app.redis import close

from .conftest import assert_error, bearer

MESSAGE = {"type": "user_message", "content": "hello"}


@pytest.fixture()
def cid(client, key) -> str:
    """A conversation of Alice's with no events."""
    response = client.post("/api/conversations", headers=bearer(key))
    assert response.status_code == 200
    return response.get_json()["conversation_id"]


def post(client, key: str, cid: str, body: object = None, *, headers: dict | None = None, **kwargs):
    """POST an action (JSON-encoded unless `data` is given); the response."""
    if "data" not in kwargs:
        kwargs["json"] = MESSAGE if body is None else body
    return client.post(f"/api/conversations/{cid}/events", headers={**bearer(key), **(headers or {})}, **kwargs)


def post_ok(client, key: str, cid: str, body: object = None, **kwargs) -> int:
    """POST an action that must succeed; its event id."""
    response = post(client, key, cid, body, **kwargs)
    assert response.status_code == 200, response.data
    answer = response.get_json()
    assert answer == {"status": "ok", "success": True, "event_id": answer["event_id"]}
    assert type(answer["event_id"]) is int
    return answer["event_id"]


def list_events(client, key: str, cid: str, query: str = "") -> dict:
    """GET .../events; the answer."""
    response = client.get(f"/api/conversations/{cid}/events{query}", headers=bearer(key))
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/json"
    return response.get_json()


def stored(client, key: str, cid: str) -> list[dict]:
    """Every stored event."""
    return list_events(client, key, cid, "?limit=1000")["events"]


# Posting --------------------------------------------------------------------------------------


def test_post_answer_and_the_stored_event(client, key, cid):
    before = datetime.now(UTC)
    response = post(client, key, cid, data='{"type":"user_message","content":"hello"}', content_type="application/json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok", "success": True, "event_id": 0}
    [event] = stored(client, key, cid)
    assert list(event) == ["id", "timestamp", "source", "type", "content"]
    assert event["id"] == 0
    assert event["source"] == "user"
    assert event["type"] == "user_message"
    assert event["content"] == "hello"
    timestamp = datetime.fromisoformat(event["timestamp"])
    assert timestamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= timestamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", event["timestamp"])


def test_openhands_action_form(client, key, cid):
    body = {"action": "message", "args": {"content": "hi", "image_urls": [], "wait_for_response": False}}
    assert post_ok(client, key, cid, data=json.dumps(body), content_type="application/json") == 0
    [event] = stored(client, key, cid)
    assert event == {"id": 0, "timestamp": event["timestamp"], "source": "user", **body}


def test_other_fields_are_kept_exactly_as_posted(client, key, cid):
    raw = ('{"type":"tool_call","zeta":1,"alpha":{"z":[1,2.5,null,true,false],"a":{"deep":{"er":"ü✓😀\\n"}}},'
           '"content":"","big":9007199254740993,"neg":-0.5,"empty":{},"list":[]}')
    assert post_ok(client, key, cid, data=raw, content_type="application/json") == 0
    text = client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).get_data(as_text=True)
    event = json.loads(text, object_pairs_hook=list)[0][1][0]
    posted = json.loads(raw, object_pairs_hook=list)
    assert [k for k, _ in event] == ["id", "timestamp", "source"] + [k for k, _ in posted]
    assert event[3:] == posted  # values, nested key order, unicode: all as posted
    assert dict(event)["source"] == "user"


def test_the_stored_json_is_served_as_is(app, client, key, cid):
    post_ok(client, key, cid, {"type": "x", "text": "é"})
    body = client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).data
    [entry] = app.extensions["redis"].xrange(f"conv:{{{cid}}}:events")
    assert body == b'{"events":[' + entry[1][b"e"] + b'],"has_more":false}'
    assert "é".encode() in body  # UTF-8, not \u escapes


def test_event_ids_are_consecutive_from_0(client, key, cid):
    ids = [post_ok(client, key, cid, {"type": "note", "n": n}) for n in range(12)]
    assert ids == list(range(12))
    assert [e["id"] for e in stored(client, key, cid)] == ids
    assert [e["n"] for e in stored(client, key, cid)] == list(range(12))
    conversation = client.get(f"/api/conversations/{cid}", headers=bearer(key)).get_json()
    assert conversation["last_event_id"] == 11


def test_each_conversation_counts_from_0(client, key, cid):
    other = client.post("/api/conversations", json={"initial_user_msg": "first"}, headers=bearer(key))
    other_cid = other.get_json()["conversation_id"]
    assert post_ok(client, key, cid) == 0
    assert post_ok(client, key, other_cid) == 1
    assert post_ok(client, key, cid) == 1


@pytest.mark.parametrize("body", [
    {"type": "user_message"},
    {"type": "user_message", "content": ""},
    {"type": "user_message", "content": None},
    {"type": "user_message", "content": 5},
    {"type": "user_message", "content": ["hi"]},
    {"action": "message"},
    {"action": "message", "args": {}},
    {"action": "message", "args": {"content": ""}},
    {"action": "message", "args": {"content": 1}},
    {"action": "message", "args": "hi"},
    {"action": "message", "content": "hi"},
])
def test_message_content_rules(client, key, cid, body):
    assert "content" in assert_error(post(client, key, cid, body), 400, "bad_request")["message"]
    assert stored(client, key, cid) == []


@pytest.mark.parametrize("body", [
    {"content": "no kind"},
    {},
    {"type": ""},
    {"type": "x" * 65},
    {"type": "User_Message"},
    {"type": "user-message"},
    {"type": "user message"},
    {"type": "ünïcode"},
    {"type": 5},
    {"type": None},
    {"action": ""},
    {"action": "Message", "args": {"content": "x"}},
    {"action": ["message"]},
])
def test_kind_pattern(client, key, cid, body):
    assert_error(post(client, key, cid, body), 400, "bad_request")
    assert stored(client, key, cid) == []


@pytest.mark.parametrize("kind", ["a", "x" * 64, "run_2", "0"])
def test_kind_pattern_accepts(client, key, cid, kind):
    assert post_ok(client, key, cid, {"type": kind}) == 0
    assert post_ok(client, key, cid, {"action": kind}) == 1
    assert [(e.get("type"), e.get("action")) for e in stored(client, key, cid)] == [(kind, None), (None, kind)]


def test_kinds_other_than_messages_need_no_content(client, key, cid):
    assert post_ok(client, key, cid, {"type": "agent_state_changed"}) == 0
    [event] = stored(client, key, cid)
    assert set(event) == {"id", "timestamp", "source", "type"}


@pytest.mark.parametrize(("field", "value"), [
    ("id", 7), ("id", 0), ("id", None), ("timestamp", "2020-01-01T00:00:00+00:00"), ("timestamp", None),
    ("source", "agent"), ("source", "environment"), ("source", "USER"), ("source", None), ("source", ""),
])
def test_server_fields_cannot_be_posted(client, key, cid, field, value):
    body = {"type": "user_message", "content": "x", field: value}
    assert f"'{field}'" in assert_error(post(client, key, cid, body), 400, "bad_request")["message"]
    assert stored(client, key, cid) == []


def test_a_posted_source_user_is_replaced(client, key, cid):
    raw = '{"source":"user","type":"user_message","content":"x"}'
    assert post_ok(client, key, cid, data=raw, content_type="application/json") == 0
    text = client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).get_data(as_text=True)
    pairs = json.loads(text, object_pairs_hook=list)[0][1][0]
    assert [k for k, _ in pairs] == ["id", "timestamp", "source", "type", "content"]  # one `source`


def test_events_written_by_the_runtime_are_listed_with_their_source(app, client, key, cid):
    store = app.extensions["store"]
    post_ok(client, key, cid)
    assert store.append_event(None, cid, {"type": "agent_message", "content": "done"}, source="agent") == (1, False)
    assert post_ok(client, key, cid) == 2
    assert [e["source"] for e in stored(client, key, cid)] == ["user", "agent", "user"]


# Bodies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"[]", b"[1, 2]", b'"a string"', b"42", b"null", b"true", b"{", b"{'type': 'x'}", b"not json",
    b"", b"   ", b"\xff\xfe\x00", b'{"type": "x", "v": NaN}', b'{"type":"x","s":"\\ud800"}',
    b"[" * 100_000, b'{"a":' * 50_000, b"{" * 100_000,
])
def test_body_must_be_a_json_object(client, key, cid, data):
    response = post(client, key, cid, data=data, content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert b"Traceback" not in response.data
    assert stored(client, key, cid) == []


@pytest.mark.parametrize(("data", "content_type"), [
    (b'{"type":"user_message","content":"x"}', "text/plain"),
    (b'{"type":"user_message","content":"x"}', None),
    (b'{"type":"user_message","content":"x"}', "application/x-www-form-urlencoded"),
    (b'{"type":"user_message","content":"x"}', "multipart/form-data; boundary=x"),
    (b'{"type":"user_message","content":"x"}', "application/jsonx"),
    (b"", None),
])
def test_body_must_be_sent_as_json(client, key, cid, data, content_type):
    kwargs = {"content_type": content_type} if content_type else {}
    assert_error(post(client, key, cid, data=data, **kwargs), 415, "unsupported_media_type")
    assert stored(client, key, cid) == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.oh+json",
                                          "Application/JSON"])
def test_json_content_types(client, key, cid, content_type):
    assert post_ok(client, key, cid, data=json.dumps(MESSAGE), content_type=content_type) == 0


def body_of_size(size: int) -> bytes:
    """A valid user_message body of exactly `size` bytes."""
    frame = b'{"type":"user_message","content":""}'
    body = frame[:-2] + b"x" * (size - len(frame)) + frame[-2:]
    assert len(body) == size
    return body


def test_body_up_to_the_limit_is_taken(app, client, key, cid):
    limit = app.config["MAX_EVENT_BYTES"]
    assert limit == 262144
    assert post_ok(client, key, cid, data=body_of_size(limit), content_type="application/json") == 0
    assert post_ok(client, key, cid, data=body_of_size(limit - 1), content_type="application/json") == 1
    assert len(stored(client, key, cid)[0]["content"]) == limit - len(b'{"type":"user_message","content":""}')


@pytest.mark.parametrize("extra", [1, 1000, 5_000_000])
def test_body_over_the_limit_is_413(app, client, key, cid, extra):
    limit = app.config["MAX_EVENT_BYTES"]
    response = post(client, key, cid, data=body_of_size(limit + extra), content_type="application/json")
    assert str(limit) in assert_error(response, 413, "payload_too_large")["message"]
    assert stored(client, key, cid) == []


def post_chunked(client, key: str, path: str, body: bytes):
    """POST a body without Content-Length, as a server that decoded a chunked request passes it on."""
    response = client.post(
        path, headers=bearer(key), content_type="application/json", input_stream=io.BytesIO(body),
        environ_overrides={"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True},
    )
    assert response.request.content_length is None
    return response


@pytest.mark.parametrize("extra", [1, 10, 1_000_000])
def test_chunked_body_over_the_limit_is_413(app, client, key, cid, extra):
    limit = app.config["MAX_EVENT_BYTES"]
    response = post_chunked(client, key, f"/api/conversations/{cid}/events", body_of_size(limit + extra))
    assert_error(response, 413, "payload_too_large")
    # Not even a valid object followed by padding past the limit gets through.
    padded = b'{"type":"user_message","content":"x"}' + b" " * (limit + extra)
    response = post_chunked(client, key, f"/api/conversations/{cid}/events", padded)
    assert_error(response, 413, "payload_too_large")
    response = post_chunked(client, key, "/api/conversations", b"{}" + b" " * (limit + extra))
    assert_error(response, 413, "payload_too_large")
    assert stored(client, key, cid) == []


@pytest.mark.parametrize("size", [262144, 262143, 100])
def test_chunked_body_up_to_the_limit_is_taken(client, key, cid, size):
    response = post_chunked(client, key, f"/api/conversations/{cid}/events", body_of_size(size))
    assert response.status_code == 200, response.data
    assert len(stored(client, key, cid)) == 1


def test_a_smaller_configured_limit(redis_server, redis_client):
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "MAX_EVENT_BYTES": 100})
    try:
        client = app.test_client()
        key = app.extensions["store"].create_api_key("alice")[1]
        cid = client.post("/api/conversations", headers=bearer(key)).get_json()["conversation_id"]
        assert post_ok(client, key, cid, data=body_of_size(100), content_type="application/json") == 0
        response = post(client, key, cid, data=body_of_size(101), content_type="application/json")
        assert "100 bytes" in assert_error(response, 413)["message"]
        # The limit holds for every JSON body, conversation creation included.
        response = client.post("/api/conversations", json={"initial_user_msg": "x" * 100}, headers=bearer(key))
        assert_error(response, 413)
    finally:
        close(app.extensions["redis"])


# Listing ----------------------------------------------------------------------------------------


def test_listing_of_a_conversation_without_events(client, key, cid):
    assert list_events(client, key, cid) == {"events": [], "has_more": False}


def test_listing_with_start_id_limit_and_has_more(client, key, cid):
    for n in range(10):
        post_ok(client, key, cid, {"type": "note", "n": n})

    def ids(query: str) -> tuple[list[int], bool]:
        answer = list_events(client, key, cid, query)
        assert set(answer) == {"events", "has_more"}
        return [e["id"] for e in answer["events"]], answer["has_more"]

    assert ids("") == (list(range(10)), False)
    assert ids("?start_id=3&limit=4") == ([3, 4, 5, 6], True)
    assert ids("?start_id=6&limit=4") == ([6, 7, 8, 9], False)
    assert ids("?start_id=7&limit=4") == ([7, 8, 9], False)
    assert ids("?limit=10") == (list(range(10)), False)
    assert ids("?limit=9") == (list(range(9)), True)
    assert ids("?start_id=9") == ([9], False)
    assert ids("?start_id=10") == ([], False)
    assert ids("?start_id=999999999999") == ([], False)
    assert ids("?start_id=&limit=") == (list(range(10)), False)
    assert ids("?limit=1") == ([0], True)


def test_paging_through_events_has_no_repeats_and_no_gaps(client, key, cid):
    for n in range(23):
        post_ok(client, key, cid, {"type": "note", "n": n})
    seen, start = [], 0
    while True:
        answer = list_events(client, key, cid, f"?start_id={start}&limit=5")
        seen += [e["id"] for e in answer["events"]]
        if not answer["has_more"]:
            break
        start = answer["events"][-1]["id"] + 1
    assert seen == list(range(23))


def test_default_limit_is_100_and_the_maximum_is_1000(app, client, key, cid):
    store = app.extensions["store"]
    for n in range(1001):
        store.append_event("alice", cid, {"type": "note", "n": n}, source="user")
    default = list_events(client, key, cid)
    assert [e["id"] for e in default["events"]] == list(range(100))
    assert default["has_more"] is True
    clamped = list_events(client, key, cid, "?limit=5000")
    assert [e["id"] for e in clamped["events"]] == list(range(1000))
    assert clamped["has_more"] is True
    assert list_events(client, key, cid, "?start_id=1&limit=1000")["has_more"] is False


@pytest.mark.parametrize("query", [
    "start_id=-1", "start_id=x", "start_id=1.0", "start_id=0x1",
    "limit=0", "limit=-1", "limit=x", "limit=2.5", "limit=1e3",
])
def test_bad_listing_parameters_are_400(client, key, cid, query):
    post_ok(client, key, cid)
    body = assert_error(client.get(f"/api/conversations/{cid}/events?{query}", headers=bearer(key)), 400)
    assert query.split("=")[0] in body["message"]


def test_a_page_of_a_conversation_deleted_after_its_owner_was_read_is_a_404(app, client, key, cid):
    """The listing reads the owner with the key, then the page: a deletion between the two is no empty page."""
    from app.errors import NotFound

    client.post(f"/api/conversations/{cid}/events", json={"type": "user_message", "content": "x"}, headers=bearer(key))
    store = app.extensions["store"]
    assert store.events_page(cid, 0, 10)[0]  # the owner has been checked (by the view): the page is read
    assert client.delete(f"/api/conversations/{cid}", headers=bearer(key)).status_code == 200
    with pytest.raises(NotFound):
        store.events_page(cid, 0, 10)


def test_listing_unknown_conversation_is_404(client, key):
    assert_error(client.get("/api/conversations/nope/events", headers=bearer(key)), 404, "not_found")


def test_posting_to_unknown_conversation_is_404(client, key, redis_client):
    assert_error(post(client, key, "nope"), 404, "not_found")
    assert list(redis_client.scan_iter("conv:*")) == []


# Idempotency-Key --------------------------------------------------------------------------------


def test_a_retry_gets_the_same_answer_and_adds_nothing(client, key, cid):
    headers = {"Idempotency-Key": "req-1"}
    first = post(client, key, cid, MESSAGE, headers=headers)
    assert first.status_code == 200
    post_ok(client, key, cid, {"type": "note"})  # something else happens in between
    retry = post(client, key, cid, MESSAGE, headers=headers)
    assert retry.status_code == 200
    assert retry.get_json() == first.get_json() == {"status": "ok", "success": True, "event_id": 0}
    assert [e["type"] for e in stored(client, key, cid)] == ["user_message", "note"]


def test_the_same_key_with_another_body_is_409(client, key, cid):
    headers = {"Idempotency-Key": "req-1"}
    assert post_ok(client, key, cid, MESSAGE, headers=headers) == 0
    conflict = post(client, key, cid, {"type": "user_message", "content": "other"}, headers=headers)
    assert_error(conflict, 409, "conflict")
    assert "Set-Cookie" not in conflict.headers
    assert len(stored(client, key, cid)) == 1


def test_different_keys_make_different_events(client, key, cid):
    assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "a"}) == 0
    assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "b"}) == 1
    assert post_ok(client, key, cid, MESSAGE) == 2
    assert post_ok(client, key, cid, MESSAGE) == 3  # no key: every post is a new event


def test_the_key_is_per_conversation(client, key, cid):
    other = client.post("/api/conversations", headers=bearer(key)).get_json()["conversation_id"]
    post_ok(client, key, cid, {"type": "note"})
    assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "same"}) == 1
    assert post_ok(client, key, other, MESSAGE, headers={"Idempotency-Key": "same"}) == 0
    assert len(stored(client, key, other)) == 1
    assert len(stored(client, key, cid)) == 2


def test_a_failed_post_does_not_use_up_the_key(client, key, cid):
    headers = {"Idempotency-Key": "k"}
    assert_error(post(client, key, cid, {"type": "BAD"}, headers=headers), 400)
    assert post_ok(client, key, cid, MESSAGE, headers=headers) == 0


def test_the_key_is_stored_hashed_and_expires(app, client, key, cid, redis_client):
    secret_key = "my-idempotency-key-1234"
    post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": secret_key})
    [record] = list(redis_client.scan_iter(f"conv:{{{cid}}}:idem:*"))
    assert secret_key.encode() not in record
    assert 86400 - 5 <= redis_client.ttl(record) <= 86400


def test_the_key_lifetime_is_a_setting(redis_server, redis_client):
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "IDEMPOTENCY_TTL_SECONDS": 60})
    try:
        client = app.test_client()
        key = app.extensions["store"].create_api_key("alice")[1]
        cid = client.post("/api/conversations", headers=bearer(key)).get_json()["conversation_id"]
        post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "k"})
        [record] = list(redis_client.scan_iter(f"conv:{{{cid}}}:idem:*"))
        assert 55 <= redis_client.ttl(record) <= 60
        redis_client.delete(record)  # as if it had expired
        assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "k"}) == 1
    finally:
        close(app.extensions["redis"])


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\tkey", "ünï"])
def test_bad_idempotency_keys_are_400(client, key, cid, value):
    response = client.post(f"/api/conversations/{cid}/events", json=MESSAGE,
                           headers=[("Authorization", f"Bearer {key}"), ("Idempotency-Key", value)])
    assert "Idempotency-Key" in assert_error(response, 400)["message"]
    assert stored(client, key, cid) == []


def test_a_key_of_255_characters_is_taken(client, key, cid):
    assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "k" * 255}) == 0
    assert post_ok(client, key, cid, MESSAGE, headers={"Idempotency-Key": "k" * 255}) == 0


# Concurrency ------------------------------------------------------------------------------------


def run_threads(count: int, target) -> list:
    """Run `target(i)` in `count` threads started together; their results (exceptions re-raised)."""
    results: list = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = target(i)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_concurrent_posts_get_unique_consecutive_ids(app, key, cid):
    threads, per_thread = 8, 6

    def poster(i: int) -> list[int]:
        own = app.test_client()
        return [post_ok(own, key, cid, {"type": "note", "thread": i, "n": n}) for n in range(per_thread)]

    results = run_threads(threads, poster)
    ids = sorted(i for thread_ids in results for i in thread_ids)
    assert ids == list(range(threads * per_thread))
    for thread_ids in results:
        assert thread_ids == sorted(thread_ids)  # one thread's posts are ordered
    events = stored(app.test_client(), key, cid)
    assert [e["id"] for e in events] == ids
    by_id = {e["id"]: (e["thread"], e["n"]) for e in events}
    for thread, thread_ids in enumerate(results):
        assert [by_id[i] for i in thread_ids] == [(thread, n) for n in range(per_thread)]


def test_concurrent_retries_with_one_key_add_one_event(app, key, cid):
    def poster(_i: int) -> int:
        return post_ok(app.test_client(), key, cid, MESSAGE, headers={"Idempotency-Key": "once"})

    assert run_threads(12, poster) == [0] * 12
    assert len(stored(app.test_client(), key, cid)) == 1


# Retention --------------------------------------------------------------------------------------


@pytest.fixture()
def retention_app(redis_server, redis_client):
    """The app keeping 5 events per conversation."""
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "EVENT_RETENTION": 5})
    yield app
    close(app.extensions["redis"])


def test_retention_keeps_the_last_events(retention_app):
    client = retention_app.test_client()
    key = retention_app.extensions["store"].create_api_key("alice")[1]
    cid = client.post("/api/conversations", json={"initial_user_msg": "first"}, headers=bearer(key)).get_json()[
        "conversation_id"]
    ids = [post_ok(client, key, cid, {"type": "note", "n": n}) for n in range(11)]
    assert ids == list(range(1, 12))  # ids go on counting
    answer = list_events(client, key, cid, "?start_id=0")
    assert [e["id"] for e in answer["events"]] == [7, 8, 9, 10, 11]
    assert answer["has_more"] is False
    assert [e["id"] for e in list_events(client, key, cid, "?start_id=9")["events"]] == [9, 10, 11]
    assert [e["id"] for e in list_events(client, key, cid, "?limit=2")["events"]] == [7, 8]
    assert list_events(client, key, cid, "?limit=2")["has_more"] is True
    assert client.get(f"/api/conversations/{cid}", headers=bearer(key)).get_json()["last_event_id"] == 11
    assert retention_app.extensions["redis"].xlen(f"conv:{{{cid}}}:events") == 5


def test_retention_with_few_events_keeps_them_all(retention_app):
    client = retention_app.test_client()
    key = retention_app.extensions["store"].create_api_key("alice")[1]
    cid = client.post("/api/conversations", json={"initial_user_msg": "first"}, headers=bearer(key)).get_json()[
        "conversation_id"]
    for _ in range(4):
        post_ok(client, key, cid)
    assert [e["id"] for e in list_events(client, key, cid)["events"]] == [0, 1, 2, 3, 4]
    post_ok(client, key, cid)
    assert [e["id"] for e in list_events(client, key, cid)["events"]] == [1, 2, 3, 4, 5]
