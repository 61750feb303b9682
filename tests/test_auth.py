"""Auth: Bearer API keys, the session cookie they mint, revocation, hashed storage, ownership."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner

from app import create_app
from app.auth import COOKIE_NAME
from app.config import secret_from_file
from app.redis import close
from app.store import Store, conv_events_key, conv_meta_key

from .conftest import ON_CLUSTER, bearer, create, xrange_calls
from .sse_client import open_stream

SSE = "/api/sse/conversations/{cid}/events"


def assert_401(response) -> None:
    """A 401 with the JSON error body of API.md, and no cookie."""
    assert response.status_code == 401, response.data
    assert response.mimetype == "application/json"
    assert response.get_json() == {
        "status": "error", "error": "unauthorized", "message": response.get_json()["message"],
    }
    assert response.get_json()["message"]
    assert "Set-Cookie" not in response.headers


def session_cookie(response) -> str:
    """The value of the session cookie a response sets."""
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{COOKIE_NAME}=")]
    assert len(headers) == 1, response.headers
    return headers[0].split(";", 1)[0].split("=", 1)[1]


def cookie_attributes(response) -> set[str]:
    """The attributes of the session cookie's Set-Cookie header (lower case, values kept)."""
    header = response.headers["Set-Cookie"]
    return {part.strip().lower() for part in header.split(";")[1:]}


def cookie_only_client(app, value: str):
    """A fresh test client that has nothing but the session cookie."""
    fresh = app.test_client()
    fresh.set_cookie(COOKIE_NAME, value)
    return fresh


def every_route(cid: str) -> list[tuple[str, str, dict]]:
    """(method, path, kwargs) of every REST route on conversation `cid`."""
    return [
        ("GET", "/api/conversations", {}),
        ("POST", "/api/conversations", {"json": {}}),
        ("GET", f"/api/conversations/{cid}", {}),
        ("DELETE", f"/api/conversations/{cid}", {}),
        ("POST", f"/api/conversations/{cid}/events", {"json": {"type": "user_message", "content": "hi"}}),
        ("GET", f"/api/conversations/{cid}/events", {}),
        ("GET", SSE.format(cid=cid), {}),
    ]


# 401 ------------------------------------------------------------------------------------------


def test_no_credentials_is_401_on_every_route(app, client, make_key, redis_client):
    cid = create(app.test_client(), make_key("alice"))
    keys_before = sorted(redis_client.keys("*"))
    for method, path, kwargs in every_route(cid):
        assert_401(app.test_client().open(path, method=method, **kwargs))
    # Nothing was written, and the conversation is still there.
    assert sorted(redis_client.keys("*")) == keys_before


@pytest.mark.parametrize("header", [
    "Bearer",
    "Bearer ",
    "Bearer nonsense",
    "Bearer ohk_",
    "Bearer ohk_0123456789abcdef",
    "Bearer ohk_0123456789abcdef_",
    "Bearer ohk_0123456789abcdeg_secret",
    "Bearer ohk_0123456789abcdef_secret",  # well shaped, unknown id
    "Bearer ohk_0x23456789abcdef_secret",
    "Bearer ohk_{123456789abcde}_secret",
    "Basic YWxpY2U6c2VjcmV0",
    "Token x",
    "",
    "ohk_0123456789abcdef_secret",
])
def test_malformed_or_unknown_credentials_are_401(client, make_key, header):
    make_key("alice")
    assert_401(client.get("/api/conversations", headers={"Authorization": header}))


def test_a_key_with_a_wrong_secret_is_401(client, make_key):
    key = make_key("alice")
    last = "A" if key[-1] != "A" else "B"
    assert_401(client.get("/api/conversations", headers=bearer(key[:-1] + last)))
    assert_401(client.get("/api/conversations", headers=bearer(key + "x")))
    assert_401(client.get("/api/conversations", headers=bearer(key[:-1])))
    assert client.get("/api/conversations", headers=bearer(key)).status_code == 200


def test_the_key_id_of_one_key_with_the_secret_of_another_is_401(client, make_key):
    one, other = make_key("alice"), make_key("alice")
    mixed = one[:21] + other[21:]  # "ohk_" + 16 hex of `one`, then "_secret" of `other`
    assert mixed not in (one, other)
    assert_401(client.get("/api/conversations", headers=bearer(mixed)))


def test_scheme_is_case_insensitive_and_spaces_around_the_key_are_ignored(client, make_key):
    key = make_key("alice")
    for header in (f"bearer {key}", f"BEARER {key}", f"Bearer   {key}  "):
        response = client.get("/api/conversations", headers={"Authorization": header})
        assert response.status_code == 200, (header, response.data)


def test_revoked_key_is_401_on_the_next_request(app, client, make_key):
    key = make_key("alice")
    assert client.get("/api/conversations", headers=bearer(key)).status_code == 200
    key_id = key.split("_")[1]
    assert app.extensions["store"].revoke_api_key(key_id)
    assert_401(app.test_client().get("/api/conversations", headers=bearer(key)))


def test_revoking_one_key_leaves_the_others_working(app, client, make_key):
    one, two = make_key("alice"), make_key("alice")
    app.extensions["store"].revoke_api_key(one.split("_")[1])
    assert_401(client.get("/api/conversations", headers=bearer(one)))
    assert client.get("/api/conversations", headers=bearer(two)).status_code == 200


def test_a_bad_bearer_is_401_even_with_a_valid_cookie(app, make_key):
    """An Authorization header is the credential when sent: a valid cookie does not rescue a bad one."""
    key = make_key("alice")
    response = app.test_client().get("/api/conversations", headers=bearer(key))
    fresh = cookie_only_client(app, session_cookie(response))
    assert fresh.get("/api/conversations").status_code == 200
    assert_401(fresh.get("/api/conversations", headers={"Authorization": "Bearer wrong"}))


# The session cookie ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("GET", "/api/conversations", {}),
    ("POST", "/api/conversations", {}),
    ("GET", "/api/conversations/{cid}", {}),
    ("POST", "/api/conversations/{cid}/events", {"json": {"type": "user_message", "content": "x"}}),
    ("GET", "/api/conversations/{cid}/events", {}),
    ("DELETE", "/api/conversations/{cid}", {}),
])
def test_every_2xx_answer_to_a_bearer_request_sets_the_cookie(app, make_key, method, path, kwargs):
    key = make_key("alice")
    cid = create(app.test_client(), key)
    response = app.test_client().open(path.format(cid=cid), method=method, headers=bearer(key), **kwargs)
    assert response.status_code == 200, response.data
    assert session_cookie(response)
    attributes = cookie_attributes(response)
    assert {"httponly", "samesite=lax", "path=/"} <= attributes
    assert f"max-age={app.config['SESSION_MAX_AGE_SECONDS']}" in attributes
    assert "secure" not in attributes  # plain http
    assert not any(a.startswith("domain=") for a in attributes)


def test_the_cookie_is_secure_over_https(app, make_key):
    key = make_key("alice")
    response = app.test_client().get("/api/conversations", headers=bearer(key), base_url="https://localhost")
    assert response.status_code == 200
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= cookie_attributes(response)
    response = app.test_client().get(
        "/api/conversations", headers=bearer(key), environ_overrides={"wsgi.url_scheme": "https"}
    )
    assert "secure" in cookie_attributes(response)


def test_x_forwarded_proto_is_left_to_the_server(app, make_key):
    """The app trusts no header itself: gunicorn sets the scheme from a trusted proxy's X-Forwarded-Proto."""
    key = make_key("alice")
    response = app.test_client().get("/api/conversations", headers={**bearer(key), "X-Forwarded-Proto": "https"})
    assert response.status_code == 200
    assert "secure" not in cookie_attributes(response)


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/api/conversations/nope", {}, 404),
    ("DELETE", "/api/conversations/nope", {}, 404),
    ("GET", "/api/conversations?limit=0", {}, 400),
    ("POST", "/api/conversations", {"json": {"repository": "bad"}}, 400),
    ("POST", "/api/conversations", {"data": "x", "content_type": "text/plain"}, 415),
    ("POST", "/api/conversations/{cid}/events", {"json": {"type": "BAD"}}, 400),
    ("POST", "/api/conversations/{cid}/events", {"data": b"{}" * 200_000, "content_type": "application/json"}, 413),
    ("PUT", "/api/conversations/{cid}", {}, 405),
    ("GET", "/api/conversations/{cid}/nothing", {}, 404),
])
def test_no_cookie_on_4xx(app, make_key, method, path, kwargs, status):
    key = make_key("alice")
    cid = create(app.test_client(), key)
    response = app.test_client().open(path.format(cid=cid), method=method, headers=bearer(key), **kwargs)
    assert response.status_code == status, response.data
    assert "Set-Cookie" not in response.headers


def test_the_cookie_alone_authenticates(app, make_key):
    key = make_key("alice")
    cid = create(app.test_client(), key, initial_user_msg="hello")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(key)))

    fresh = cookie_only_client(app, cookie)
    listing = fresh.get("/api/conversations")
    assert listing.status_code == 200
    assert [c["conversation_id"] for c in listing.get_json()["results"]] == [cid]
    assert fresh.get(f"/api/conversations/{cid}").status_code == 200
    posted = fresh.post(f"/api/conversations/{cid}/events", json={"type": "user_message", "content": "via cookie"})
    assert posted.get_json() == {"status": "ok", "success": True, "event_id": 1}
    events = fresh.get(f"/api/conversations/{cid}/events").get_json()["events"]
    assert [(e["source"], e["content"]) for e in events] == [("user", "hello"), ("user", "via cookie")]
    # Cookie-authenticated answers do not mint a cookie of their own.
    for response in (listing, posted):
        assert "Set-Cookie" not in response.headers


def test_the_test_client_keeps_the_cookie_between_requests(app, make_key):
    key = make_key("alice")
    browser = app.test_client()
    assert browser.get("/api/conversations", headers=bearer(key)).status_code == 200
    assert browser.get_cookie(COOKIE_NAME) is not None
    response = browser.get("/api/conversations")  # no header now
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers


def test_the_cookie_is_the_users_identity(app, make_key):
    alice, bob = make_key("alice"), make_key("bob")
    alice_cid = create(app.test_client(), alice)
    bob_cid = create(app.test_client(), bob)
    bob_cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(bob)))
    fresh = cookie_only_client(app, bob_cookie)
    assert [c["conversation_id"] for c in fresh.get("/api/conversations").get_json()["results"]] == [bob_cid]
    assert fresh.get(f"/api/conversations/{alice_cid}").status_code == 404


def test_revoking_the_key_ends_its_cookie_on_the_next_request(app, make_key):
    key = make_key("alice")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(key)))
    fresh = cookie_only_client(app, cookie)
    assert fresh.get("/api/conversations").status_code == 200
    app.extensions["store"].revoke_api_key(key.split("_")[1])
    assert_401(fresh.get("/api/conversations"))
    assert_401(cookie_only_client(app, cookie).get("/api/conversations"))


def test_revoking_another_key_of_the_user_leaves_the_cookie_working(app, make_key):
    key, other = make_key("alice"), make_key("alice")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(key)))
    app.extensions["store"].revoke_api_key(other.split("_")[1])
    assert cookie_only_client(app, cookie).get("/api/conversations").status_code == 200


@pytest.mark.parametrize("tamper", [
    # The first signature character: the last one may only carry padding bits that decoding ignores.
    lambda c: c.rsplit(".", 1)[0] + "." + ("A" if c.rsplit(".", 1)[1][0] != "A" else "B") + c.rsplit(".", 1)[1][1:],
    lambda c: c.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAA",
    lambda c: "ffffffffffffffff" + c[16:],
    lambda c: c.split(".", 1)[0],
    lambda c: "",
    lambda c: "garbage",
    lambda c: ".".join(["x"] * 3),
])
def test_a_tampered_cookie_is_401(app, make_key, tamper):
    key = make_key("alice")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(key)))
    assert cookie_only_client(app, cookie).get("/api/conversations").status_code == 200
    assert_401(cookie_only_client(app, tamper(cookie)).get("/api/conversations"))


def test_a_cookie_edited_to_name_another_users_key_or_another_generation_is_401(app, make_key):
    """The signature covers the key id and the generation: neither can be moved to another user or past a sign-out."""
    alice, bob = make_key("alice"), make_key("bob")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(alice)))
    key_id, rest = cookie.split(":", 1)
    gen, signature = rest.split(".", 1)
    assert gen == "g0"
    assert cookie_only_client(app, cookie).get("/api/session").get_json()["user_id"] == "alice"
    assert_401(cookie_only_client(app, f"{bob.split('_')[1]}:{rest}").get("/api/session"))
    assert_401(cookie_only_client(app, f"{key_id}:g1.{signature}").get("/api/session"))
    assert_401(cookie_only_client(app, f"{key_id}.{signature}").get("/api/session"))  # its generation dropped


def test_an_expired_cookie_is_401(app, make_key):
    key = make_key("alice")
    secret = secret_from_file(Path(app.config["SECRET_KEY_FILE"])).encode()

    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - app.config["SESSION_MAX_AGE_SECONDS"] - 5

    key_id = key.split("_")[1]
    old = Past(secret.decode(), salt="oh-session").sign(key_id).decode()
    fresh = TimestampSigner(secret.decode(), salt="oh-session").sign(key_id).decode()
    assert cookie_only_client(app, fresh).get("/api/conversations").status_code == 200
    assert_401(cookie_only_client(app, old).get("/api/conversations"))


def test_a_cookie_signed_with_another_secret_is_401(app, make_key):
    key = make_key("alice")
    forged = TimestampSigner("not the secret", salt="oh-session").sign(key.split("_")[1]).decode()
    assert_401(cookie_only_client(app, forged).get("/api/conversations"))


def test_cookies_work_across_workers_of_a_host(app, redis_server, make_key, redis_client):
    """Every worker signs with the secret in SECRET_KEY_FILE, so a cookie from one works in another."""
    key = make_key("alice")
    cookie = session_cookie(app.test_client().get("/api/conversations", headers=bearer(key)))
    other = create_app({"REDIS_URL": redis_server.url, "TESTING": True})
    try:
        assert cookie_only_client(other, cookie).get("/api/conversations").status_code == 200
    finally:
        close(other.extensions["redis"])
    assert not [k for k in redis_client.keys("*") if b"secret" in k]  # nothing of it lives in Redis


def test_a_configured_secret_key_signs_the_cookies(redis_server, redis_client):
    one = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "SECRET_KEY": "s3cret-one"})
    two = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "SECRET_KEY": "s3cret-two"})
    try:
        key = one.extensions["store"].create_api_key("alice")[1]
        cookie = session_cookie(one.test_client().get("/api/conversations", headers=bearer(key)))
        payload = TimestampSigner("s3cret-one", salt="oh-session").unsign(cookie).decode()
        assert payload == f"{key.split('_')[1]}:g0"  # the key id and its cookie generation, which a sign-out raises
        assert cookie_only_client(one, cookie).get("/api/conversations").status_code == 200
        assert_401(cookie_only_client(two, cookie).get("/api/conversations"))
    finally:
        close(one.extensions["redis"])
        close(two.extensions["redis"])


def test_the_cookie_does_not_contain_the_key(app, make_key):
    key = make_key("alice")
    response = app.test_client().get("/api/conversations", headers=bearer(key))
    secret = key.split("_", 2)[2]
    assert secret not in response.headers["Set-Cookie"]
    assert key not in response.headers["Set-Cookie"]


# Keys are stored hashed -----------------------------------------------------------------------


def all_redis_bytes(redis_client) -> bytes:
    """Every key name and every value in the tests' Redis, concatenated."""
    out = []
    for name in redis_client.scan_iter("*"):
        out.append(name)
        kind = redis_client.type(name)
        if kind == b"string":
            out.append(redis_client.get(name))
        elif kind == b"hash":
            for k, v in redis_client.hgetall(name).items():
                out += [k, v]
        elif kind == b"set":
            out += list(redis_client.smembers(name))
        elif kind == b"zset":
            out += [m for m, _ in redis_client.zrange(name, 0, -1, withscores=True)]
        elif kind == b"list":
            out += list(redis_client.lrange(name, 0, -1))
        elif kind == b"stream":
            for _id, fields in redis_client.xrange(name):
                for k, v in fields.items():
                    out += [k, v]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {name!r}")
    return b"\n".join(out)


def test_keys_are_stored_hashed(app, client, make_key, redis_client):
    key = make_key("alice")
    secret = key.split("_", 2)[2]
    # Use it: requests, a cookie, a conversation, events.
    cid = create(client, key, initial_user_msg="hi")
    client.post(f"/api/conversations/{cid}/events", json={"type": "user_message", "content": "x"}, headers=bearer(key))
    stored = all_redis_bytes(redis_client)
    assert stored  # the scan saw the data
    assert secret.encode() not in stored
    assert key.encode() not in stored
    record = redis_client.hgetall(f"apikey:{{{key.split('_')[1]}}}")
    assert set(record) == {b"user_id", b"hash", b"created_at"}
    assert record[b"user_id"] == b"alice"
    assert len(record[b"hash"]) == 64


def test_keys_are_long_and_random(make_key):
    keys = {make_key("alice") for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        prefix, key_id, secret = key.split("_", 2)
        assert prefix == "ohk"
        assert len(key_id) == 16
        assert len(secret) >= 43  # 32 random bytes, base64url
    assert len({k.split("_")[1] for k in keys}) == 20


# Another user's conversation is 404 -----------------------------------------------------------


def redis_snapshot(redis_client) -> dict[bytes, tuple]:
    """Every key in the tests' Redis with its type, its whole content and whether it expires."""
    readers = {
        b"string": redis_client.get,
        b"hash": redis_client.hgetall,
        b"list": lambda name: redis_client.lrange(name, 0, -1),
        b"set": redis_client.smembers,
        b"zset": lambda name: redis_client.zrange(name, 0, -1, withscores=True),
        b"stream": redis_client.xrange,
    }
    snapshot = {}
    for name in redis_client.scan_iter("*"):
        kind = redis_client.type(name)
        snapshot[name] = (kind, readers[kind](name), redis_client.pttl(name) >= 0)
    return snapshot


def assert_untouched(redis_client, before: dict[bytes, tuple], cid: str, events: int,
                     agents_told_again: bool = False) -> None:
    """Nothing in Redis changed since `before`; the conversation still holds exactly `events` events.

    `agents_told_again`: but for an entry in the agents' work shard (a replay on a Cluster adds
    one, as the first attempt may have died before telling them; its inbox is unchanged).
    """
    assert redis_client.xlen(conv_events_key(cid)) == events
    assert redis_client.hget(conv_meta_key(cid), "last_event_id") == str(events - 1).encode()
    after = redis_snapshot(redis_client)
    assert after.keys() == before.keys()
    for name, state in before.items():
        if agents_told_again and name.startswith(b"agent:work:"):
            continue
        assert after[name] == state, name


def comparable(response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Everything of an answer but what differs between any two answers (its request id, its date)."""
    headers = sorted((k, v) for k, v in response.headers.items() if k not in ("X-Request-ID", "Date"))
    return response.status_code, response.get_data(), headers


def test_another_users_conversation_is_404_on_every_route(app, make_key, redis_client):
    """Exactly the answer an id that does not exist gets: status, body and headers, on every route."""
    alice, bob = make_key("alice"), make_key("bob")
    cid = create(app.test_client(), alice, initial_user_msg="secret plan", repository="acme/app")
    missing = Store.new_conversation_id()  # shaped like a real id, stored nowhere
    bob_client = app.test_client()
    routes = [
        ("GET", "/api/conversations/{cid}", {}),
        ("DELETE", "/api/conversations/{cid}", {}),
        ("POST", "/api/conversations/{cid}/events", {"json": {"type": "user_message", "content": "hijack"}}),
        ("POST", "/api/conversations/{cid}/events", {"json": {"action": "message", "args": {"content": "hijack"}},
                                                  "headers": {"Idempotency-Key": "bob-1"}}),
        ("GET", "/api/conversations/{cid}/events", {}),
        ("GET", "/api/conversations/{cid}/events?start_id=0&limit=5", {}),
        ("GET", SSE, {}),
        ("GET", SSE, {"headers": {"Last-Event-ID": "0"}}),
        ("HEAD", SSE, {}),
        ("DELETE", "/api/conversations/{cid}", {}),
    ]
    before = redis_snapshot(redis_client)
    assert conv_meta_key(cid).encode() in before and conv_events_key(cid).encode() in before
    for method, path, kwargs in routes:
        answers = []
        for conversation in (cid, missing):
            headers = {**bearer(bob), **kwargs.get("headers", {})}
            rest = {k: v for k, v in kwargs.items() if k != "headers"}
            answers.append(bob_client.open(path.format(cid=conversation), method=method, headers=headers, **rest))
        theirs, nobodys = answers
        assert theirs.status_code == 404, (method, path, theirs.data)
        # The same answer as for an id that does not exist at all: nothing is revealed.
        assert comparable(theirs) == comparable(nobodys), (method, path)
        assert b"secret plan" not in theirs.data
    # Nothing was written: not an event, not a key, not a field (checked on Redis itself).
    assert_untouched(redis_client, before, cid, events=1)
    # Bob's listing does not show it, and nothing of Alice's changed.
    assert bob_client.get("/api/conversations", headers=bearer(bob)).get_json() == {
        "results": [], "next_page_id": None,
    }
    mine = app.test_client().get(f"/api/conversations/{cid}", headers=bearer(alice))
    assert mine.status_code == 200
    assert mine.get_json()["last_event_id"] == 0
    events = app.test_client().get(f"/api/conversations/{cid}/events", headers=bearer(alice)).get_json()
    assert [e["content"] for e in events["events"]] == ["secret plan"]
    assert_untouched(redis_client, before, cid, events=1)


def test_another_users_idempotency_key_does_not_reach_the_conversation(app, make_key, redis_client):
    alice, bob = make_key("alice"), make_key("bob")
    cid = create(app.test_client(), alice)
    body = {"type": "user_message", "content": "hi"}
    first = app.test_client().post(f"/api/conversations/{cid}/events", json=body,
                                   headers={**bearer(alice), "Idempotency-Key": "k1"})
    assert first.status_code == 200
    before = redis_snapshot(redis_client)
    # Alice's key with her body, with another body, and a fresh key: none reaches her conversation.
    for idem, sent in (("k1", body), ("k1", {"type": "user_message", "content": "other"}), ("k2", body)):
        replay = app.test_client().post(f"/api/conversations/{cid}/events", json=sent,
                                        headers={**bearer(bob), "Idempotency-Key": idem})
        assert replay.status_code == 404, (idem, replay.data)
        assert b'"event_id"' not in replay.data
    assert_untouched(redis_client, before, cid, events=1)
    # Alice's own retry still gets her answer, and adds nothing either.
    again = app.test_client().post(f"/api/conversations/{cid}/events", json=body,
                                   headers={**bearer(alice), "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.get_json() == first.get_json()
    assert_untouched(redis_client, before, cid, events=1, agents_told_again=ON_CLUSTER)


def test_another_users_id_reads_no_events_even_while_its_owner_streams_it(server, api, make_key, redis_client):
    """A stream open in the worker makes its owner's next open read ahead; never another user's 404 (timing)."""
    cid = api.create(initial_user_msg="secret plan")
    mine = open_stream(server.port, SSE.format(cid=cid), bearer(api.key))
    assert len(mine.take(2)) == 2
    bob = make_key("bob")
    before = xrange_calls(redis_client)
    for _ in range(3):
        assert open_stream(server.port, SSE.format(cid=cid), bearer(bob)).status == 404
    assert xrange_calls(redis_client) == before
    # Alice's second tab still gets the backlog with its opening (tests/test_stream_prefetch.py).
    second = open_stream(server.port, SSE.format(cid=cid), bearer(api.key))
    assert len(second.take(2)) == 2 and xrange_calls(redis_client) - before == 1
