"""A stream's open: its checks, made in one round trip with the key's record, answer as every route does.

Flask's test client runs no gevent, so a stream that passes every check is answered `503
streaming_unavailable` here: that answer says the checks before it all passed.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner

from app.auth import COOKIE_NAME
from app.config import secret_from_file

from .conftest import assert_error, bearer, create

SSE = "/api/sse/conversations/{}/events"


def set_cookies(response) -> list[str]:
    """The session cookie lines a response sets."""
    return [h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{COOKIE_NAME}=")]


def test_a_stream_open_checks_the_caller_first_then_the_input_then_the_conversation(app, make_key):
    alice, bob = make_key("alice"), make_key("bob")
    cid = create(app.test_client(), alice)
    client = app.test_client()  # with no cookie: only what each request sends
    bad = {"Authorization": "Bearer ohk_0123456789abcdef_nope"}
    assert_error(client.get(SSE.format(cid)), 401, "unauthorized")
    assert_error(client.get(SSE.format(cid), headers=bad), 401, "unauthorized")
    assert_error(client.get(SSE.format(cid) + "?latest_event_id=x", headers=bad), 401, "unauthorized")
    assert_error(client.get(SSE.format(cid) + "?providers_set=nope", headers=bad), 401, "unauthorized")
    assert_error(client.get(SSE.format("a}b") + "?latest_event_id=x", headers=bad), 401, "unauthorized")
    # Authenticated: a malformed input is a 400 before the conversation is looked at.
    assert_error(client.get(SSE.format("unknown") + "?latest_event_id=-2", headers=bearer(alice)), 400)
    assert_error(client.get(SSE.format(cid), headers={**bearer(bob), "Last-Event-ID": "1.5"}), 400)
    assert_error(client.get(SSE.format(cid) + "?providers_set=nope", headers=bearer(bob)), 400)
    for other in ("unknown", "a}b", "x" * 65):
        assert_error(client.get(SSE.format(other), headers=bearer(alice)), 404, "not_found")
    assert_error(client.get(SSE.format(cid), headers=bearer(bob)), 404, "not_found")
    # Every check passed: only streaming is missing (no gevent in the test client).
    assert_error(client.get(SSE.format(cid), headers=bearer(alice)), 503, "streaming_unavailable")


def test_a_revoked_key_or_a_deleted_conversation_cannot_open_a_stream(app, make_key):
    alice = make_key("alice")
    client = app.test_client()
    cid = create(client, alice)
    client = app.test_client()
    assert client.delete(f"/api/conversations/{cid}", headers=bearer(alice)).status_code == 200
    assert_error(client.get(SSE.format(cid), headers=bearer(alice)), 404, "not_found")
    cid = create(client, alice)
    assert app.extensions["store"].revoke_api_key(alice.split("_")[1])
    assert_error(client.get(SSE.format(cid), headers=bearer(alice)), 401, "unauthorized")


def test_a_stream_head_is_answered_with_the_stream_headers_and_the_cookie(app, make_key):
    alice = make_key("alice")
    client = app.test_client()
    cid = create(client, alice)
    response = client.head(SSE.format(cid), headers=bearer(alice))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert len(set_cookies(response)) == 1
    cookie = set_cookies(response)[0].split(";", 1)[0].split("=", 1)[1]
    browser = app.test_client()
    browser.set_cookie(COOKIE_NAME, cookie)
    by_cookie = browser.head(SSE.format(cid))
    assert by_cookie.status_code == 200
    assert not set_cookies(by_cookie)  # a cookie-authenticated answer mints none
    assert_error(browser.get(SSE.format(cid)), 503, "streaming_unavailable")


def test_the_cookie_of_one_second_is_made_per_key_and_scheme(app, make_key):
    alice, bob = make_key("alice"), make_key("bob")
    signer = TimestampSigner(app.config["SECRET_KEY"] or _secret(app), salt="oh-session")
    client = app.test_client()
    lines = {}
    for name, key in (("alice", alice), ("bob", bob)):
        for scheme in ("http", "https"):
            response = client.get("/api/conversations", headers=bearer(key), base_url=f"{scheme}://localhost")
            (lines[name, scheme],) = set_cookies(response)
    for (name, scheme), line in lines.items():
        value, *attributes = [part.strip() for part in line.split(";")]
        key_id = (alice if name == "alice" else bob).split("_")[1]
        assert signer.unsign(value.split("=", 1)[1]).decode() == f"{key_id}:g0"  # <key id>:g<generation>
        assert ("Secure" in attributes) == (scheme == "https")
        assert {"HttpOnly", "Path=/", "SameSite=Lax", f"Max-Age={app.config['SESSION_MAX_AGE_SECONDS']}"} \
            <= set(attributes)


def test_a_later_second_mints_a_fresh_cookie(app, make_key, monkeypatch):
    alice = make_key("alice")
    signer = TimestampSigner(app.config["SECRET_KEY"] or _secret(app), salt="oh-session")
    client = app.test_client()
    now = int(time.time())
    stamps = []
    for at in (now, now, now + 5):
        monkeypatch.setattr(time, "time", lambda at=at: at + 0.25)
        (line,) = set_cookies(client.get("/api/conversations", headers=bearer(alice)))
        value = line.split(";", 1)[0].split("=", 1)[1]
        stamps.append(signer.unsign(value, return_timestamp=True)[1].timestamp())
    monkeypatch.undo()
    assert stamps == [now, now, now + 5]


def _secret(app) -> str:
    """The cookie secret of the app (made once per host in SECRET_KEY_FILE when SECRET_KEY is empty)."""
    return secret_from_file(Path(app.config["SECRET_KEY_FILE"]))


@pytest.mark.parametrize("header", ["Bearer", "Basic abc", "Bearer ohk_zz"])
def test_a_malformed_authorization_header_is_a_401_even_with_a_cookie(app, make_key, header):
    alice = make_key("alice")
    client = app.test_client()
    cid = create(client, alice)  # the test client keeps the cookie it got
    assert_error(client.get(SSE.format(cid), headers={"Authorization": header}), 401, "unauthorized")
    assert_error(client.get(SSE.format(cid)), 503, "streaming_unavailable")
