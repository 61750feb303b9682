"""Sign-out revokes on the server: the cookies the key minted before it are 401 everywhere, their streams end.

A cookie signs the key's cookie generation (`cookie_gen` in its record, raised by each sign-out)
and is valid only while that is still the key's: no clock is compared anywhere.
"""
from __future__ import annotations

import time

import pytest

from app.auth import COOKIE_NAME, revoke_cookies
from app.keys import COOKIE_GEN, api_key_key

from .conftest import Api, assert_error, bearer
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"


def cookie_of(response) -> str:
    """The `name=value` of the session cookie a response sets."""
    lines = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(COOKIE_NAME + "=")]
    assert len(lines) == 1, response.headers
    return lines[0].split(";", 1)[0]


def test_sign_out_revokes_the_keys_cookies_on_every_browser_and_a_new_sign_in_works(app, key, make_key,
                                                                                      redis_client):
    one, two, plain = (app.test_client(use_cookies=False) for _ in range(3))
    laptop = {"Cookie": cookie_of(one.post("/api/session", headers=bearer(key)))}
    phone = {"Cookie": cookie_of(two.get("/api/conversations", headers=bearer(key)))}
    bob_key = make_key("bob")
    bob = {"Cookie": cookie_of(plain.post("/api/session", headers=bearer(bob_key)))}
    for cookie in (laptop, phone, bob):
        assert plain.get("/api/session", headers=cookie).status_code == 200
    out = one.delete("/api/session", headers=laptop)
    assert out.status_code == 200 and "Max-Age=0" in out.headers["Set-Cookie"]
    assert redis_client.hget(api_key_key(key.split("_")[1]), COOKIE_GEN) == b"1"
    # Both of alice's cookies are dead wherever they are kept; bob's is not.
    for cookie in (laptop, phone):
        assert_error(plain.get("/api/session", headers=cookie), 401, "unauthorized")
        assert_error(plain.get("/api/conversations", headers=cookie), 401, "unauthorized")
    assert plain.get("/api/session", headers=bob).status_code == 200
    # The key itself still works, and at once mints a cookie that works (not the cached one of this second).
    again = plain.post("/api/session", headers=bearer(key))
    assert again.status_code == 200
    fresh = {"Cookie": cookie_of(again)}
    assert plain.get("/api/session", headers=fresh).get_json()["user_id"] == "alice"
    # Signing out with a revoked cookie clears it and changes nothing; a Bearer sign-out revokes too.
    assert plain.delete("/api/session", headers=laptop).status_code == 200
    assert plain.get("/api/session", headers=fresh).status_code == 200
    bearer_out = plain.delete("/api/session", headers=bearer(key))
    assert bearer_out.status_code == 200 and "Max-Age=0" in bearer_out.headers["Set-Cookie"]
    assert_error(plain.get("/api/session", headers=fresh), 401, "unauthorized")


def test_a_sign_out_from_another_origin_is_refused_and_revokes_nothing(app, key):
    client = app.test_client(use_cookies=False)
    cookie = {"Cookie": cookie_of(client.post("/api/session", headers=bearer(key)))}
    assert_error(client.delete("/api/session", headers={**cookie, "Sec-Fetch-Site": "same-site",
                                                        "Origin": "http://evil.localhost"}), 403, "forbidden")
    assert client.get("/api/session", headers=cookie).status_code == 200


def test_signing_out_twice_revokes_the_cookies_of_each_sign_in(app, key, redis_client):
    """Sign out, sign in again elsewhere with the key, sign out again: the second browser's cookie dies too."""
    laptop_client, phone_client, plain = (app.test_client(use_cookies=False) for _ in range(3))
    laptop = {"Cookie": cookie_of(laptop_client.post("/api/session", headers=bearer(key)))}
    assert laptop_client.delete("/api/session", headers=laptop).status_code == 200
    # In the same second: the line cached for this second (of the old generation) is not handed out again.
    phone = {"Cookie": cookie_of(phone_client.post("/api/session", headers=bearer(key)))}
    assert phone != laptop
    assert plain.get("/api/session", headers=phone).status_code == 200
    assert_error(plain.get("/api/session", headers=laptop), 401, "unauthorized")
    assert phone_client.delete("/api/session", headers=phone).status_code == 200
    assert_error(plain.get("/api/session", headers=phone), 401, "unauthorized")
    assert redis_client.hget(api_key_key(key.split("_")[1]), COOKIE_GEN) == b"2"
    # A sign-out with a cookie already signed out revokes nothing more.
    assert plain.delete("/api/session", headers=phone).status_code == 200
    assert redis_client.hget(api_key_key(key.split("_")[1]), COOKIE_GEN) == b"2"
    with app.app_context():
        assert not revoke_cookies("0123456789abcdef")  # no such key: nothing is written
    assert not redis_client.exists(api_key_key("0123456789abcdef"))


@pytest.mark.parametrize("skew", [-86_400, 86_400])
def test_no_clock_decides_a_sign_out(app, key, monkeypatch, skew):
    """The signing-out host's clock a day behind or ahead: the cookies minted before it die, the next one works."""
    client = app.test_client(use_cookies=False)
    before = {"Cookie": cookie_of(client.post("/api/session", headers=bearer(key)))}
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    with app.app_context():
        assert revoke_cookies(key.split("_")[1])  # as `flask keys sign-out` on that host
    monkeypatch.undo()
    assert_error(client.get("/api/session", headers=before), 401, "unauthorized")
    after = {"Cookie": cookie_of(client.post("/api/session", headers=bearer(key)))}
    assert client.get("/api/session", headers=after).status_code == 200


@pytest.mark.timeout(60)
def test_sign_out_ends_the_keys_cookie_streams_within_two_seconds_and_leaves_its_bearer_streams(server, api, make_key,
                                                                                               redis_client):
    cid = api.create(initial_user_msg="x")
    _, _, headers = api.call("POST", "/api/session")
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    bob = Api(server.base, make_key("bob"))
    bob_cid = bob.create(initial_user_msg="y")
    bob_cookie = bob.call("POST", "/api/session")[2]["Set-Cookie"].split(";", 1)[0]
    by_cookie = open_stream(server.port, SSE.format(cid), {"Cookie": cookie})
    by_key = open_stream(server.port, SSE.format(cid), bearer(api.key))
    bobs = open_stream(server.port, SSE.format(bob_cid), {"Cookie": bob_cookie})
    assert len(by_cookie.take(2)) == 2 and len(by_key.take(2)) == 2 and len(bobs.take(2)) == 2
    started = time.monotonic()
    status, _, _ = api.call("DELETE", "/api/session", headers={"Cookie": cookie})
    assert status == 200
    assert by_cookie.ended(timeout=10)
    # API.md's bound for revocation, + 0.5 s for this reader's own wake-up on a loaded machine.
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 0.5, f"the cookie stream ended {elapsed:.2f} s after the sign-out"
    assert open_stream(server.port, SSE.format(cid), {"Cookie": cookie}).status == 401
    # The key's Bearer stream and another user's cookie stream go on: an event still reaches both.
    api.post(cid)
    bob.post(bob_cid)
    assert by_key.take(1) and bobs.take(1)
    # A fresh sign-in streams again, and its stream outlives the hub's next check of the key (of its generation).
    fresh = api.call("POST", "/api/session")[2]["Set-Cookie"].split(";", 1)[0]
    by_fresh = open_stream(server.port, SSE.format(cid), {"Cookie": fresh})
    assert by_fresh.status == 200 and len(by_fresh.take(3)) == 3
    witness_key = make_key("carol")  # its stream ends at the first check after the fresh one registered
    witness = open_stream(server.port, SSE.format(Api(server.base, witness_key).create()), bearer(witness_key))
    assert len(witness.take(1)) == 1
    redis_client.hset(api_key_key(witness_key.split("_")[1]), "revoked_at", "now")
    assert witness.ended(timeout=10)
    api.post(cid, type="after_the_check")
    assert [e.json()["type"] for e in by_fresh.take(1)] == ["after_the_check"]
    # The next sign-out ends it.
    assert api.call("DELETE", "/api/session", headers={"Cookie": fresh})[0] == 200
    assert by_fresh.ended(timeout=10)
    for stream in (by_key, bobs, by_fresh, witness):
        stream.close()


def test_the_cli_signs_a_key_out_of_every_browser(app, key):
    runner = app.test_cli_runner()
    client = app.test_client(use_cookies=False)
    cookie = {"Cookie": cookie_of(client.post("/api/session", headers=bearer(key)))}
    wrong_secret = "_".join(key.split("_")[:2]) + "_wrong"
    for given in ("ohk_0123456789abcdef_nope", wrong_secret, "0123456789abcdef"):
        result = runner.invoke(args=["keys", "sign-out", given])
        assert result.exit_code != 0 and "no such key" in result.output, given
    assert client.get("/api/session", headers=cookie).status_code == 200
    result = runner.invoke(args=["keys", "sign-out", key])
    assert result.exit_code == 0 and key.split("_")[1] in result.output
    assert key.split("_", 2)[2] not in result.output
    assert_error(client.get("/api/session", headers=cookie), 401, "unauthorized")
    assert client.get("/api/session", headers=bearer(key)).status_code == 200  # the key itself still works


def test_a_cookie_of_the_first_release_shape_is_generation_0_and_signed_out_too(app, key):
    """A cookie of the old shape (the key id alone) is valid until the key's first sign-out."""
    client = app.test_client(use_cookies=False)
    old = {"Cookie": f"{COOKIE_NAME}={app.extensions['session_signer'].sign(key.split('_')[1]).decode()}"}
    assert client.get("/api/session", headers=old).status_code == 200
    with app.app_context():
        assert revoke_cookies(key.split("_")[1])
    assert_error(client.get("/api/session", headers=old), 401, "unauthorized")


def test_a_cookie_signing_a_mint_time_is_refused_not_taken_for_a_generation(app, key, redis_client):
    """`<key id>:<unix ms>` (an unreleased build's shape) is 401, even once the key has signed out that often."""
    client = app.test_client(use_cookies=False)
    signer = app.extensions["session_signer"]
    stamp = int(time.time() * 1000)
    redis_client.hset(api_key_key(key.split("_")[1]), COOKIE_GEN, stamp)
    for payload in (f"{key.split('_')[1]}:{stamp}", f"{key.split('_')[1]}:g{stamp}x", f"{key.split('_')[1]}:g"):
        assert_error(client.get("/api/session", headers={"Cookie": f"{COOKIE_NAME}={signer.sign(payload).decode()}"}),
                     401, "unauthorized")
    fresh = {"Cookie": cookie_of(client.post("/api/session", headers=bearer(key)))}
    assert client.get("/api/session", headers=fresh).status_code == 200  # the key's own generation: valid
