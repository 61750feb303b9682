"""Signing in and out of the web app (/api/session) and the security headers every answer carries."""
from __future__ import annotations

import time
from unittest import mock

from app.auth import COOKIE_NAME
from app.web import CONTENT_SECURITY_POLICY

from .conftest import assert_error, bearer


def session_cookie(response) -> str | None:
    """The Set-Cookie line for the session cookie, if the response has one."""
    for line in response.headers.getlist("Set-Cookie"):
        if line.startswith(COOKIE_NAME + "="):
            return line
    return None


def test_sign_in_with_the_key_sets_the_cookie_that_then_authenticates_alone(client, key):
    answer = client.post("/api/session", headers=bearer(key))
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ok", "user_id": "alice"}
    line = session_cookie(answer)
    assert line and "HttpOnly" in line and "SameSite=Lax" in line and "Path=/" in line
    assert key not in line  # the cookie names the key, it does not hold it
    assert client.get_cookie(COOKIE_NAME) is not None  # the test client keeps it, as a browser does
    who = client.get("/api/session")  # no Authorization header: the cookie alone
    assert who.status_code == 200 and who.get_json()["user_id"] == "alice"
    assert session_cookie(who) is None  # a cookie caller is not handed a new cookie
    assert client.get("/api/conversations").status_code == 200


def test_sign_in_needs_the_key_itself(client, key):
    client.post("/api/session", headers=bearer(key))
    body = assert_error(client.post("/api/session"), 400, "bad_request")
    assert "Bearer" in body["message"]
    assert_error(client.post("/api/session", headers=bearer("ohk_0123456789abcdef_wrong")), 401)
    client.delete_cookie(COOKIE_NAME)
    assert_error(client.post("/api/session"), 401)


def test_sign_out_clears_the_cookie_even_when_it_is_no_longer_valid(client, key):
    client.post("/api/session", headers=bearer(key))
    out = client.delete("/api/session")
    assert out.status_code == 200 and out.get_json() == {"status": "ok"}
    line = session_cookie(out)
    assert line and "Max-Age=0" in line and "HttpOnly" in line
    assert_error(client.get("/api/session"), 401)
    client.set_cookie(COOKIE_NAME, "forged.value.here")
    assert client.delete("/api/session").status_code == 200  # a bad cookie can still be cleared
    assert_error(client.get("/api/session"), 401)


def test_sign_out_with_a_bearer_key_mints_no_new_cookie(client, key):
    out = client.delete("/api/session", headers=bearer(key))
    assert out.status_code == 200
    lines = [line for line in out.headers.getlist("Set-Cookie") if line.startswith(COOKIE_NAME + "=")]
    assert len(lines) == 1 and "Max-Age=0" in lines[0]


def test_the_page_and_every_answer_carry_the_security_headers(client, key):
    for response in (client.get("/"), client.get("/api/conversations", headers=bearer(key)),
                     client.get("/api/conversations"), client.get("/static/openhands-client.js"),
                     client.get("/no/such/page")):
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Frame-Options"] == "DENY"
        response.close()  # a static file's answer holds the file open until closed
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'" and "unsafe" not in CONTENT_SECURITY_POLICY



def test_a_cookie_cannot_write_from_another_origin(client, key):
    client.post("/api/session", headers=bearer(key))  # signed in: the client holds the cookie
    action = {"type": "user_message", "content": "hi"}
    cid = client.post("/api/conversations", json={}).get_json()["conversation_id"]
    for origin in ("http://evil.localhost", "http://localhost:9999", "null"):
        body = assert_error(client.post(f"/api/conversations/{cid}/events", json=action,
                                        headers={"Origin": origin}), 403, "forbidden")
        assert "Bearer" in body["message"]
        assert_error(client.delete(f"/api/conversations/{cid}", headers={"Origin": origin}), 403, "forbidden")
    events = client.get(f"/api/conversations/{cid}/events", headers={"Origin": "http://evil.localhost"})
    assert events.status_code == 200 and events.get_json()["events"] == []  # reads are not writes
    same = client.post(f"/api/conversations/{cid}/events", json=action, headers={"Origin": "http://localhost"})
    assert same.status_code == 200 and same.get_json()["event_id"] == 0
    with_key = client.post(f"/api/conversations/{cid}/events", json=action,
                           headers={"Origin": "http://evil.localhost", **bearer(key)})
    assert with_key.status_code == 200  # a Bearer key is not sent by a browser on its own: no CSRF
    assert client.post(f"/api/conversations/{cid}/events", json=action).status_code == 200  # no Origin: curl


def test_the_page_is_html_and_loads_only_its_own_scripts(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/static/openhands-client.js" in html and "/static/app.js" in html
    assert "<script>" not in html and " on" + "click=" not in html and "style=" not in html
    with client.get("/static/openhands-client.js") as script:
        assert script.status_code == 200 and script.mimetype == "text/javascript"



def signed_in_cookie(client, key) -> dict[str, str]:
    """A Cookie header holding the session cookie that signing in with `key` sets."""
    return {"Cookie": session_cookie(client.post("/api/session", headers=bearer(key))).split(";")[0]}


def test_sec_fetch_site_decides_whatever_host_a_proxy_passes(app, key):
    client = app.test_client(use_cookies=False)  # the Cookie header is the test's alone
    cookie = signed_in_cookie(client, key)
    action = {"type": "user_message", "content": "hi"}
    cid = client.post("/api/conversations", json={}, headers=cookie).get_json()["conversation_id"]
    url = f"/api/conversations/{cid}/events"
    for site in ("same-site", "cross-site"):  # e.g. a sibling subdomain, or http:// of the same host
        assert_error(client.post(url, json=action, headers={**cookie, "Sec-Fetch-Site": site,
                                                            "Origin": "http://localhost"}), 403, "forbidden")
    # A proxy that passes the upstream's Host (nginx's default): the browser's own word is taken.
    same = client.post(url, json=action, headers={**cookie, "Sec-Fetch-Site": "same-origin",
                                                  "Host": "127.0.0.1:8000", "Origin": "https://chat.example.com"})
    assert same.status_code == 200
    # Without Sec-Fetch-Site, Origin against Host: case and default ports do not matter.
    assert client.post(url, json=action, headers={**cookie, "Origin": "http://LOCALHOST:80"}).status_code == 200
    assert client.post(url, json=action, headers={**cookie, "Origin": "https://chat.example.com",
                                                  "Host": "Chat.Example.com:443"}).status_code == 200
    assert_error(client.post(url, json=action, headers={**cookie, "Origin": "https://chat.example.com.evil.io",
                                                        "Host": "chat.example.com"}), 403, "forbidden")


def test_a_planted_session_cookie_neither_locks_out_nor_wins(app, key, make_key):
    client = app.test_client(use_cookies=False)
    ours = signed_in_cookie(client, key)["Cookie"]
    # Another origin of the same site planted garbage under a longer path: sent first, skipped.
    who = client.get("/api/session", headers={"Cookie": f"{COOKIE_NAME}=garbage; {ours}"})
    assert who.status_code == 200 and who.get_json()["user_id"] == "alice"
    # A valid cookie of another user, planted earlier than our sign-in: ours, the newest signed, wins.
    signer = app.extensions["session_signer"]
    mallory_key_id = make_key("mallory").split("_")[1]
    with mock.patch.object(type(signer), "get_timestamp", return_value=int(time.time()) - 60):
        planted = signer.sign(mallory_key_id).decode()
    who = client.get("/api/session", headers={"Cookie": f"{COOKIE_NAME}={planted}; {ours}"})
    assert who.get_json()["user_id"] == "alice"
    assert client.get("/api/session", headers={"Cookie": f"{COOKIE_NAME}={planted}"}).get_json()["user_id"] == "mallory"
    assert_error(client.get("/api/session", headers={"Cookie": f"{COOKIE_NAME}=garbage"}), 401)
