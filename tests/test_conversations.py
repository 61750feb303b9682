"""Conversations over REST: create, read, list with paging, delete."""
from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest

from .conftest import assert_error, bearer, create

FIELDS = {"conversation_id", "repository", "selected_branch", "title", "created_at", "last_event_id", "agent_state"}


def get(client, key: str, cid: str) -> dict:
    """The conversation as GET shows it."""
    response = client.get(f"/api/conversations/{cid}", headers=bearer(key))
    assert response.status_code == 200, response.data
    return response.get_json()


def events(client, key: str, cid: str) -> list[dict]:
    """Every stored event of a conversation."""
    response = client.get(f"/api/conversations/{cid}/events", headers=bearer(key))
    assert response.status_code == 200, response.data
    return response.get_json()["events"]


def listing(client, key: str, query: str = "") -> dict:
    """GET /api/conversations with a query string."""
    response = client.get(f"/api/conversations{query}", headers=bearer(key))
    assert response.status_code == 200, response.data
    return response.get_json()


# Create ---------------------------------------------------------------------------------------


def test_create_answer(client, key):
    response = client.post("/api/conversations", json={}, headers=bearer(key))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"status", "conversation_id"}
    assert body["status"] == "ok"


@pytest.mark.parametrize("kwargs", [
    {},                                                    # no body, no Content-Type
    {"data": b"", "content_type": "application/json"},    # empty body
    {"data": b"  \n", "content_type": "application/json"},
    {"data": b"", "content_type": "text/plain"},          # nothing to read, so the type does not matter
    {"data": b"{}", "content_type": "application/json"},
    {"data": b"{}", "content_type": "application/json; charset=utf-8"},
    {"data": b"{}", "content_type": "application/merge-patch+json"},
])
def test_create_without_a_body(client, key, kwargs):
    response = client.post("/api/conversations", headers=bearer(key), **kwargs)
    assert response.status_code == 200, response.data
    conversation = get(client, key, response.get_json()["conversation_id"])
    assert conversation["repository"] is None
    assert conversation["selected_branch"] is None
    assert conversation["last_event_id"] == -1
    assert events(client, key, conversation["conversation_id"]) == []


def test_conversation_ids_are_url_safe_and_at_least_128_bits(client, key):
    ids = [create(client, key) for _ in range(30)]
    assert len(set(ids)) == 30
    for cid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", cid)
        raw = base64.urlsafe_b64decode(cid + "=" * (-len(cid) % 4))
        assert len(raw) * 8 >= 128
    # Random, not a counter: no common prefix across ids.
    assert len({cid[:4] for cid in ids}) > 20


def test_get_returns_exactly_the_documented_fields(client, key):
    before = datetime.now(UTC)
    cid = create(client, key, repository="octo-org/hello.world", selected_branch="feature/x-1")
    conversation = get(client, key, cid)
    assert set(conversation) == FIELDS
    assert conversation["conversation_id"] == cid
    assert conversation["repository"] == "octo-org/hello.world"
    assert conversation["selected_branch"] == "feature/x-1"
    assert conversation["last_event_id"] == -1
    assert conversation["agent_state"] is None  # no agent ran yet
    assert isinstance(conversation["title"], str) and conversation["title"]
    created = datetime.fromisoformat(conversation["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC) + timedelta(seconds=1)


def test_initial_user_msg_becomes_event_0(client, key):
    message = "Fix the flaky test ✓ 😀\nwith details"
    cid = create(client, key, initial_user_msg=message)
    conversation = get(client, key, cid)
    assert conversation["last_event_id"] == 0
    assert conversation["title"] == "Fix the flaky test ✓ 😀"
    [event] = events(client, key, cid)
    assert set(event) == {"id", "timestamp", "source", "type", "content"}
    assert event["id"] == 0
    assert event["source"] == "user"
    assert event["type"] == "user_message"
    assert event["content"] == message
    assert datetime.fromisoformat(event["timestamp"]).utcoffset() == timedelta(0)
    # The next posted event follows it.
    response = client.post(f"/api/conversations/{cid}/events", json={"type": "user_message", "content": "next"},
                           headers=bearer(key))
    assert response.get_json()["event_id"] == 1


@pytest.mark.parametrize("message", ["", None])
def test_an_empty_initial_user_msg_adds_no_event(client, key, message):
    cid = create(client, key, initial_user_msg=message)
    assert get(client, key, cid)["last_event_id"] == -1
    assert events(client, key, cid) == []
    assert get(client, key, cid)["title"] == f"Conversation {cid[:8]}"


def test_unknown_fields_are_ignored(client, key):
    cid = create(client, key, something_else={"a": 1}, title="ignored")
    assert set(get(client, key, cid)) == FIELDS


@pytest.mark.parametrize("repository", ["nope", "a/b/c", "/b", "a/", "a b/c", "ö/x", " a/b", "a/b\n"])
def test_create_rejects_a_bad_repository(client, key, repository):
    response = client.post("/api/conversations", json={"repository": repository}, headers=bearer(key))
    assert "owner/name" in assert_error(response, 400, "bad_request")["message"]


def test_an_empty_repository_or_branch_is_none(client, key):
    cid = create(client, key, repository="", selected_branch="")
    conversation = get(client, key, cid)
    assert conversation["repository"] is None
    assert conversation["selected_branch"] is None


@pytest.mark.parametrize("body", [
    {"initial_user_msg": 5},
    {"initial_user_msg": ["hi"]},
    {"initial_user_msg": {"content": "hi"}},
    {"repository": 1},
    {"repository": ["a/b"]},
    {"selected_branch": True},
    {"selected_branch": "x" * 256},
    {"selected_branch": "main\n"},
])
def test_create_rejects_wrong_types(client, key, body, redis_client):
    response = client.post("/api/conversations", json=body, headers=bearer(key))
    assert_error(response, 400, "bad_request")
    assert listing(client, key)["results"] == []


@pytest.mark.parametrize(("data", "content_type", "status", "code"), [
    (b"[]", "application/json", 400, "invalid_json"),
    (b'"text"', "application/json", 400, "invalid_json"),
    (b"null", "application/json", 400, "invalid_json"),
    (b"{bad", "application/json", 400, "invalid_json"),
    (b"[" * 100_000, "application/json", 400, "invalid_json"),
    (b"{}", "text/plain", 415, "unsupported_media_type"),
    (b"{}", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b"{}", None, 415, "unsupported_media_type"),
])
def test_create_rejects_bodies_that_are_not_json_objects(client, key, data, content_type, status, code):
    kwargs = {"content_type": content_type} if content_type else {}
    response = client.post("/api/conversations", data=data, headers=bearer(key), **kwargs)
    assert_error(response, status, code)
    assert listing(client, key)["results"] == []


def test_create_body_over_the_limit_is_413(app, client, key):
    limit = app.config["MAX_EVENT_BYTES"]
    filler = "x" * (limit - len('{"initial_user_msg":""}'))
    ok = client.post("/api/conversations", data=f'{{"initial_user_msg":"{filler}"}}',
                     content_type="application/json", headers=bearer(key))
    assert ok.status_code == 200, ok.data
    too_big = client.post("/api/conversations", data=f'{{"initial_user_msg":"{filler}x"}}',
                          content_type="application/json", headers=bearer(key))
    assert str(limit) in assert_error(too_big, 413, "payload_too_large")["message"]
    assert len(listing(client, key)["results"]) == 1


# List -----------------------------------------------------------------------------------------


def test_list_is_newest_first_and_only_the_callers(client, key, make_key):
    bob = make_key("bob")
    mine = []
    for n in range(5):
        mine.append(create(client, key, initial_user_msg=f"mine {n}"))
        create(client, bob, initial_user_msg=f"bob {n}")
    page = listing(client, key)
    assert set(page) == {"results", "next_page_id"}
    assert page["next_page_id"] is None
    assert [c["conversation_id"] for c in page["results"]] == mine[::-1]
    assert [c["title"] for c in page["results"]] == [f"mine {n}" for n in range(4, -1, -1)]
    for conversation in page["results"]:
        assert conversation == get(client, key, conversation["conversation_id"])


def test_list_is_empty_for_a_new_user(client, key):
    assert listing(client, key) == {"results": [], "next_page_id": None}


def test_list_shows_last_event_id(client, key):
    cid = create(client, key)
    for n in range(3):
        client.post(f"/api/conversations/{cid}/events", json={"type": "note", "n": n}, headers=bearer(key))
    assert listing(client, key)["results"][0]["last_event_id"] == 2


@pytest.mark.parametrize(("total", "limit"), [(25, 7), (10, 5), (3, 1), (4, 100)])
def test_paging_has_no_repeats_and_no_gaps(client, key, total, limit):
    created = [create(client, key) for _ in range(total)]
    seen, pages, query = [], 0, f"?limit={limit}"
    while True:
        page = listing(client, key, query)
        pages += 1
        assert len(page["results"]) <= limit
        seen += [c["conversation_id"] for c in page["results"]]
        if page["next_page_id"] is None:
            break
        assert isinstance(page["next_page_id"], str)
        assert len(page["results"]) == limit
        query = f"?limit={limit}&page_id={page['next_page_id']}"
        assert pages <= total
    assert seen == created[::-1]
    assert pages == -(-total // limit)


def test_paging_is_stable_when_conversations_are_created_between_pages(client, key):
    created = [create(client, key) for _ in range(6)]
    first = listing(client, key, "?limit=3")
    newer = create(client, key)
    second = listing(client, key, f"?limit=3&page_id={first['next_page_id']}")
    seen = [c["conversation_id"] for c in first["results"] + second["results"]]
    assert seen == created[::-1]
    assert second["next_page_id"] is None
    assert listing(client, key, "?limit=1")["results"][0]["conversation_id"] == newer


def test_paging_skips_deleted_conversations(client, key):
    created = [create(client, key) for _ in range(6)]
    first = listing(client, key, "?limit=2")
    client.delete(f"/api/conversations/{created[3]}", headers=bearer(key))  # on the next page
    second = listing(client, key, f"?limit=2&page_id={first['next_page_id']}")
    third = listing(client, key, f"?limit=2&page_id={second['next_page_id']}")
    seen = [c["conversation_id"] for p in (first, second, third) for c in p["results"]]
    assert seen == [created[5], created[4], created[2], created[1], created[0]]


def test_default_limit_is_20(client, key):
    created = [create(client, key) for _ in range(21)]
    page = listing(client, key)
    assert [c["conversation_id"] for c in page["results"]] == created[:0:-1]
    assert page["next_page_id"] is not None
    rest = listing(client, key, f"?page_id={page['next_page_id']}")
    assert [c["conversation_id"] for c in rest["results"]] == [created[0]]
    assert rest["next_page_id"] is None


def test_limit_above_100_is_clamped(client, key):
    for _ in range(101):
        create(client, key)
    page = listing(client, key, "?limit=1000")
    assert len(page["results"]) == 100
    assert page["next_page_id"] is not None
    assert len(listing(client, key, "?limit=101")["results"]) == 100
    assert len(listing(client, key, f"?limit=1000&page_id={page['next_page_id']}")["results"]) == 1


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1.5", "1e2", "0x10", "-99999999999999999999", "%C2%B2", "%D9%A1"])
def test_bad_limit_is_400(client, key, limit):
    create(client, key)
    body = assert_error(client.get(f"/api/conversations?limit={limit}", headers=bearer(key)), 400, "bad_request")
    assert "limit" in body["message"]


def test_empty_limit_is_the_default(client, key):
    create(client, key)
    assert len(listing(client, key, "?limit=")["results"]) == 1


@pytest.mark.parametrize("page_id", ["abc", "-1", "1.5", "1" * 19, "%20", "%C2%B2", "%D9%A1", "+1", "1%0A"])
def test_bad_page_id_is_400(client, key, page_id):
    create(client, key)
    assert_error(client.get(f"/api/conversations?page_id={page_id}", headers=bearer(key)), 400, "bad_request")


def test_empty_page_id_is_the_first_page(client, key):
    cid = create(client, key)
    assert [c["conversation_id"] for c in listing(client, key, "?page_id=")["results"]] == [cid]


def test_page_id_past_the_end_is_an_empty_page(client, key):
    create(client, key)
    assert listing(client, key, "?page_id=1") == {"results": [], "next_page_id": None}


# Delete ---------------------------------------------------------------------------------------


def test_delete_then_404_everywhere(client, key, redis_client):
    cid = create(client, key, initial_user_msg="bye")
    other = create(client, key)
    response = client.delete(f"/api/conversations/{cid}", headers=bearer(key))
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    for method, path, kwargs in [
        ("GET", f"/api/conversations/{cid}", {}),
        ("DELETE", f"/api/conversations/{cid}", {}),
        ("POST", f"/api/conversations/{cid}/events", {"json": {"type": "user_message", "content": "x"}}),
        ("GET", f"/api/conversations/{cid}/events", {}),
    ]:
        assert_error(client.open(path, method=method, headers=bearer(key), **kwargs), 404, "not_found")
    assert [c["conversation_id"] for c in listing(client, key)["results"]] == [other]
    # Its data is gone from Redis; the other conversation is untouched.
    assert list(redis_client.scan_iter(f"conv:{{{cid}}}:*")) == []
    assert redis_client.exists(f"conv:{{{other}}}:meta")
    assert get(client, key, other)["conversation_id"] == other


def test_delete_unknown_is_404(client, key):
    assert_error(client.delete("/api/conversations/nope", headers=bearer(key)), 404, "not_found")


def test_get_unknown_is_404(client, key):
    assert_error(client.get("/api/conversations/nope", headers=bearer(key)), 404, "not_found")


def test_a_whitespace_initial_user_msg_is_kept_as_event_0(client, key):
    cid = create(client, key, initial_user_msg="  \n ")
    assert [e["content"] for e in events(client, key, cid)] == ["  \n "]
    assert get(client, key, cid)["title"] == f"Conversation {cid[:8]}"


def test_list_drops_index_entries_without_a_conversation(client, key, redis_client):
    """An index entry whose conversation is gone (a create cut short) is skipped and cleaned up."""
    kept, broken = create(client, key), create(client, key)
    redis_client.delete(f"conv:{{{broken}}}:meta")
    assert [c["conversation_id"] for c in listing(client, key)["results"]] == [kept]
    assert redis_client.zrange("user:{alice}:convs", 0, -1) == [kept.encode()]
