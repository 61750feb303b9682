"""CORS: only the origins in CORS_ORIGINS, with credentials; preflights without them; a real browser's EventSource."""
from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from app import create_app
from app.config import ConfigError, load_settings
from app.redis import close

from .conftest import Api, assert_error, bearer, create

ALLOWED = "https://app.example.com"
SSE = "/api/sse/conversations/{cid}/events"


@pytest.fixture()
def cors_app(redis_server, redis_client):
    """The app with two allowed origins (one an IPv6 literal, whose brackets are regex characters)."""
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True,
                      "CORS_ORIGINS": (ALLOWED, "http://[::1]:8000")})
    yield app
    close(app.extensions["redis"])


def cors_headers(response) -> dict[str, str]:
    """The response's Access-Control-* headers."""
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def preflight(client, path: str, origin: str, method: str = "POST", headers: str = "authorization, content-type"):
    """A browser's preflight: no credentials, no cookie."""
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def test_without_cors_origins_no_answer_has_cors_headers(app, key):
    client = app.test_client(use_cookies=False)
    cid = create(client, key)
    answer = client.get(f"/api/conversations/{cid}", headers={**bearer(key), "Origin": ALLOWED})
    assert answer.status_code == 200 and cors_headers(answer) == {}
    assert "Origin" not in answer.headers.get("Vary", "")
    assert_error(preflight(client, f"/api/conversations/{cid}", ALLOWED), 401, "unauthorized")


@pytest.mark.parametrize("path", ["/api/conversations", "/api/conversations/abc/events", "/api/session",
                                  SSE.format(cid="abc")])
def test_a_preflight_from_an_allowed_origin_is_answered_without_credentials(cors_app, path):
    client = cors_app.test_client()
    answer = preflight(client, path, ALLOWED, headers="Authorization, Content-Type, Idempotency-Key, Last-Event-ID")
    assert answer.status_code == 200, answer.data
    assert "Set-Cookie" not in answer.headers
    got = cors_headers(answer)
    assert got["Access-Control-Allow-Origin"] == ALLOWED  # the one origin, never '*'
    assert got["Access-Control-Allow-Credentials"] == "true"
    assert {"GET", "POST", "DELETE"} <= {m.strip() for m in got["Access-Control-Allow-Methods"].split(",")}
    assert {h.strip().lower() for h in got["Access-Control-Allow-Headers"].split(",")} == {
        "authorization", "content-type", "idempotency-key", "last-event-id"}
    assert int(got["Access-Control-Max-Age"]) > 0
    assert "Origin" in answer.headers["Vary"]


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.com.evil.io", "http://app.example.com",
                                    "https://app.example.com:8443", "null", "http://[::1]:80001", "http://[::1]:800"])
def test_a_preflight_from_any_other_origin_gets_no_cors_headers(cors_app, origin):
    """The plain answer to an OPTIONS without credentials (a 401), and nothing that lets the browser on."""
    answer = preflight(cors_app.test_client(), "/api/conversations", origin)
    assert_error(answer, 401, "unauthorized")
    assert cors_headers(answer) == {}


def test_a_preflight_that_is_not_one_still_needs_credentials(cors_app, key):
    """An OPTIONS from an allowed origin without Access-Control-Request-Method is no preflight: as before."""
    client = cors_app.test_client()
    assert_error(client.options("/api/conversations", headers={"Origin": ALLOWED}), 401, "unauthorized")
    assert client.options("/api/conversations", headers={**bearer(key), "Origin": ALLOWED}).status_code == 200


def test_answers_to_an_allowed_origin_carry_credentials_and_expose_the_headers_a_client_reads(cors_app, key):
    client = cors_app.test_client(use_cookies=False)
    for origin in (ALLOWED, "http://[::1]:8000"):
        answer = client.get("/api/conversations", headers={**bearer(key), "Origin": origin})
        assert answer.status_code == 200
        got = cors_headers(answer)
        assert got["Access-Control-Allow-Origin"] == origin and got["Access-Control-Allow-Credentials"] == "true"
        exposed = {h.strip().lower() for h in got["Access-Control-Expose-Headers"].split(",")}
        assert {"retry-after", "x-request-id"} <= exposed
    # Errors too: a page must be able to read its 401 or 404.
    unauthorized = client.get("/api/conversations", headers={"Origin": ALLOWED})
    assert unauthorized.status_code == 401 and cors_headers(unauthorized)["Access-Control-Allow-Origin"] == ALLOWED
    # Another origin, or none: no CORS headers, whatever the credentials.
    evil = client.get("/api/conversations", headers={**bearer(key), "Origin": "https://evil.example"})
    assert cors_headers(evil) == {}
    plain = client.get("/api/conversations", headers=bearer(key))
    assert cors_headers(plain) == {} and "Origin" in plain.headers["Vary"]
    assert cors_headers(client.get("/", headers={"Origin": ALLOWED})) == {}  # the page is not the API


def test_cookie_writes_from_an_allowed_origin_pass_the_cross_origin_check_and_no_others(cors_app, key):
    client = cors_app.test_client(use_cookies=False)
    line = client.post("/api/session", headers=bearer(key)).headers["Set-Cookie"]
    cookie = {"Cookie": line.split(";")[0]}
    cid = client.post("/api/conversations", json={}, headers=cookie).get_json()["conversation_id"]
    url = f"/api/conversations/{cid}/events"
    action = {"type": "user_message", "content": "hi"}
    for site in ("same-site", "cross-site"):
        ok = client.post(url, json=action, headers={**cookie, "Sec-Fetch-Site": site, "Origin": ALLOWED})
        assert ok.status_code == 200, ok.data
        assert_error(client.post(url, json=action, headers={**cookie, "Sec-Fetch-Site": site,
                                                            "Origin": "https://evil.example"}), 403, "forbidden")
    assert client.post(url, json=action, headers={**cookie, "Origin": ALLOWED.upper()}).status_code == 200
    assert_error(client.post(url, json=action, headers={**cookie, "Origin": ALLOWED + ".evil.io"}), 403, "forbidden")


@pytest.mark.parametrize("raw", ["*", "https://app.example.com/", "app.example.com", "https://*.example.com",
                                 "https://a.example.com/path", "ftp://a.example.com", "null"])
def test_cors_origins_must_be_exact_origins(raw):
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        load_settings({"CORS_ORIGINS": f"https://ok.example.com,{raw}"})


def test_cors_origins_are_read_as_browsers_send_them():
    assert load_settings({"CORS_ORIGINS": " https://A.example.com:443 ,http://b.example.com:80, http://c:8080"})[
        "CORS_ORIGINS"] == ("https://a.example.com", "http://b.example.com", "http://c:8080")
    assert load_settings({})["CORS_ORIGINS"] == ()


# A real browser: a page of another port of the host (same site, another origin) ---------------

PAGE_SCRIPT = """async ([api, key, cid]) => {
  const signIn = await fetch(api + '/api/session', {method: 'POST', credentials: 'include',
                                                     headers: {Authorization: 'Bearer ' + key}});
  const who = await (await fetch(api + '/api/session', {credentials: 'include'})).json();
  const posted = await fetch(api + '/api/conversations/' + cid + '/events', {
    method: 'POST', credentials: 'include', headers: {'Content-Type': 'application/json', 'Idempotency-Key': 'k1'},
    body: JSON.stringify({type: 'user_message', content: 'from the other origin'})});
  const postedBody = await posted.json();
  const events = await new Promise((resolve, reject) => {
    const source = new EventSource(api + '/api/sse/conversations/' + cid + '/events', {withCredentials: true});
    const got = [];
    source.addEventListener('connection', (e) => got.push('connection'));
    source.onmessage = (e) => {
      got.push(JSON.parse(e.data).id);
      if (got.length >= 3) { source.close(); resolve(got); }
    };
    source.onerror = () => { source.close(); reject(new Error('EventSource failed after ' + JSON.stringify(got))); };
  });
  return {signIn: signIn.status, who: who.user_id, posted: posted.status, postedBody, events,
          requestId: posted.headers.get('X-Request-ID')};
}"""

BLOCKED_SCRIPT = """async ([api, key]) => {
  try { await fetch(api + '/api/conversations', {credentials: 'include', headers: {Authorization: 'Bearer ' + key}});
        return 'read'; } catch (err) { return 'blocked'; }
}"""


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves an empty page: a page of another origin (its own port on loopback, so the same site)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"<!doctype html><title>another origin</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def origins() -> Iterator[tuple[str, str]]:
    """Two pages of other origins than the API's, each served from a loopback port of its own."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    finally:
        for server, thread in zip(servers, threads):
            server.shutdown()
            server.server_close()
            thread.join(5)


@pytest.mark.timeout(60)
def test_a_page_of_an_allowed_origin_signs_in_posts_and_streams_with_credentials(start_server, make_key, page,
                                                                                 origins):
    allowed, other = origins
    server = start_server(CORS_ORIGINS=allowed)
    api = Api(server.base, make_key("alice"))
    cid = api.create(initial_user_msg="hello")
    page.goto(allowed + "/")
    result = page.evaluate(PAGE_SCRIPT, [server.base, api.key, cid])
    assert result["signIn"] == 200 and result["who"] == "alice"
    assert result["posted"] == 200 and result["postedBody"]["event_id"] >= 1  # a cookie write from that origin
    assert result["requestId"]  # an exposed header the page can read
    assert result["events"][:2] == ["connection", 0] and result["events"][2] >= 1
    page.goto(other + "/")
    assert page.evaluate(BLOCKED_SCRIPT, [server.base, api.key]) == "blocked"
