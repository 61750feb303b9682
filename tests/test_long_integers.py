"""Integers of any length in query values and headers follow API.md: clamped, empty, or waited for; never a 500."""
from __future__ import annotations

import itertools

import pytest

from .conftest import Api, assert_error, bearer, create
from .sse_client import open_stream

HUGE = [str(2**63), str(2**64), "99999999999999999999", "1" * 300, "0" * 50 + "7" * 30]


@pytest.mark.parametrize("limit", HUGE + ["1" * 5000])
def test_a_huge_limit_is_clamped_to_the_maximum(client, key, limit):
    cid = create(client, key, initial_user_msg="hello")
    listing = client.get(f"/api/conversations?limit={limit}", headers=bearer(key))
    assert listing.status_code == 200 and [c["conversation_id"] for c in listing.get_json()["results"]] == [cid]
    events = client.get(f"/api/conversations/{cid}/events?limit={limit}", headers=bearer(key))
    assert events.status_code == 200 and events.get_json() == {"events": [events.get_json()["events"][0]],
                                                               "has_more": False}


@pytest.mark.parametrize("start_id", HUGE)
def test_a_huge_start_id_is_a_page_with_no_events(client, key, start_id):
    cid = create(client, key, initial_user_msg="hello")
    response = client.get(f"/api/conversations/{cid}/events?start_id={start_id}", headers=bearer(key))
    assert response.status_code == 200
    assert response.get_json() == {"events": [], "has_more": False}


@pytest.mark.parametrize("path", ["/api/conversations?limit={n}", "/api/conversations/{cid}/events?limit={n}",
                                  "/api/conversations/{cid}/events?start_id={n}"])
def test_a_huge_negative_value_is_a_400(client, key, path):
    cid = create(client, key)
    assert_error(client.get(path.format(cid=cid, n="-" + "9" * 30), headers=bearer(key)), 400, "bad_request")


@pytest.fixture()
def api(start_server, make_key) -> Api:
    """Alice on a real gunicorn (gevent worker, heartbeat 1 s)."""
    server = start_server()
    api = Api(server.base, make_key("alice"))
    api.port = server.port
    return api


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize("value", [2**63, 2**64, 10**40])
def test_a_stream_resumed_after_a_huge_id_opens_reports_it_exactly_and_waits(api, where, value):
    cid = api.create(initial_user_msg="hello")
    path = f"/api/sse/conversations/{cid}/events"
    headers = bearer(api.key)
    if where == "query":
        path += f"?latest_event_id={value}"
    else:
        headers["Last-Event-ID"] = str(value)
    stream = open_stream(api.port, path, headers)
    assert stream.status == 200
    hello = stream.take(1)[0]
    assert hello.event == "connection" and hello.json()["latest_event_id"] == value
    api.post(cid)  # event 1 is not after `value`: the stream only pings
    seen = list(itertools.islice(stream.events(timeout=2.5, comments=True), 3))
    assert seen and all(ev.comment == "ping" for ev in seen), seen


def test_a_stream_with_a_huge_negative_id_is_a_400(api):
    cid = api.create()
    stream = open_stream(api.port, f"/api/sse/conversations/{cid}/events?latest_event_id=-{'9' * 30}", bearer(api.key))
    assert stream.status == 400 and b"latest_event_id" in stream.body


@pytest.mark.parametrize("value", ["0" * 4400, "0" * 5000 + "7", "+" + "0" * 4400 + "12"])
def test_leading_zeros_do_not_count_as_digits(client, key, value):
    cid = create(client, key, initial_user_msg="hello")
    response = client.get(f"/api/conversations/{cid}/events?start_id={value}", headers=bearer(key))
    assert response.status_code == 200, response.data


def test_ids_past_the_lua_number_format_stay_exact(app, client, key, redis_client):
    """Lua writes numbers with %.14g: ids from 10^14 on must still be written as integers."""
    cid = create(client, key)
    redis_client.hset(f"conv:{{{cid}}}:meta", "last_event_id", 10**14 - 2)
    ids = [client.post(f"/api/conversations/{cid}/events", headers=bearer(key),
                       json={"type": "user_message", "content": "x"}).get_json()["event_id"] for _ in range(3)]
    assert ids == [10**14 - 1, 10**14, 10**14 + 1]
    listed = client.get(f"/api/conversations/{cid}/events?start_id={10**14}", headers=bearer(key)).get_json()
    assert [e["id"] for e in listed["events"]] == [10**14, 10**14 + 1]


@pytest.mark.parametrize("cid", ["a}b", "{x}", "a b", "é", "x" * 65])
def test_an_id_not_shaped_like_ours_is_404_without_touching_redis(client, key, cid):
    for method in ("GET", "DELETE"):
        assert_error(client.open(f"/api/conversations/{cid}", method=method, headers=bearer(key)), 404, "not_found")
    assert_error(client.post(f"/api/conversations/{cid}/events", headers=bearer(key),
                             json={"type": "user_message", "content": "x"}), 404, "not_found")
    assert_error(client.get(f"/api/conversations/{cid}/events", headers=bearer(key)), 404, "not_found")
