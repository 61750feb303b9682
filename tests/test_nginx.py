"""Behind a real nginx (deploy/nginx.conf) over TLS and HTTP/2, in front of real gunicorn servers.

What the app believes of forwarded headers without nginx (ProxyFix, TRUSTED_PROXIES) is in test_nginx_proxies.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.errors
import httpx
import pytest

from .conftest import bearer
from .h2_client import Http2Connection
from .nginx import (
    CLIENT_ADDRESS,
    SITE_TEMPLATE,
    Nginx,
    access_log_addresses,
    make_certificate,
    nginx_binary,
    open_tls_stream,
    session_cookie_attributes,
    tls_context,
)
from .servers import ROOT, Gunicorn, RedisServer, wait_until
from .sse_client import SSEStream

SSE = "/api/sse/conversations/{}/events"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, for the module (skips without nginx)."""
    nginx_binary()
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def start_nginx(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[Callable[..., Nginx]]:
    """Start nginx in front of gunicorn servers; every nginx is stopped after the test."""
    started: list[Nginx] = []

    def start(servers: list[Gunicorn], stream_read_timeout: str = "60s") -> Nginx:
        front = Nginx(tmp_path / f"nginx-{len(started) + 1}", *certificate,
                      [f"127.0.0.1:{s.port}" for s in servers], stream_read_timeout=stream_read_timeout)
        started.append(front)
        return front.start()

    yield start
    for front in started:
        front.stop()


class HttpsApi:
    """A JSON client through nginx over https (HTTP/1.1), from CLIENT_ADDRESS."""

    def __init__(self, base: str, key: str, cert: Path):
        context = ssl.create_default_context(cafile=str(cert))
        transport = httpx.HTTPTransport(verify=context, local_address=CLIENT_ADDRESS)
        self.http = httpx.Client(base_url=base, transport=transport, timeout=10)
        self.key = key

    def call(self, method: str, path: str, body: object | None = None, headers: dict[str, str] | None = None,
             auth: bool = True) -> httpx.Response:
        """The response to one request."""
        sent = {**(bearer(self.key) if auth else {}), **(headers or {})}
        return self.http.request(method, path, json=body, headers=sent)

    def create(self) -> str:
        """Create a conversation; its id."""
        response = self.call("POST", "/api/conversations", {})
        assert response.status_code == 200, response.text
        return response.json()["conversation_id"]

    def post(self, cid: str, content: str, idempotency_key: str | None = None) -> int:
        """Post a message; its event id. Retried (same Idempotency-Key) while nginx finds no live server."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        deadline = time.monotonic() + 15
        while True:
            try:
                response = self.call("POST", f"/api/conversations/{cid}/events",
                                     {"type": "user_message", "content": content}, headers)
                if response.status_code == 200:
                    return response.json()["event_id"]
                retriable = idempotency_key is not None and response.status_code in (502, 503, 504)
                failure = f"{response.status_code} {response.text}"
            except httpx.TransportError as err:
                retriable, failure = idempotency_key is not None, repr(err)
            if not retriable or time.monotonic() > deadline:
                raise AssertionError(f"post {content!r} failed: {failure}")

    def close(self) -> None:
        """Close its connections."""
        self.http.close()


@pytest.fixture()
def https_api(make_key, certificate) -> Iterator[Callable[[Nginx], HttpsApi]]:
    """Make alice's JSON clients through an nginx; closed after the test."""
    made: list[HttpsApi] = []

    def make(front: Nginx) -> HttpsApi:
        made.append(HttpsApi(front.base, make_key("alice"), certificate[0]))
        return made[-1]

    yield make
    for api in made:
        api.close()


def stream_through(front: Nginx, cert: Path, cid: str, key: str, headers: dict[str, str] | None = None) -> SSEStream:
    """An open stream of conversation `cid` through nginx, its connection event read."""
    stream = open_tls_stream(front.https_port, SSE.format(cid), tls_context(cert),
                             {**bearer(key), **(headers or {})}, source=CLIENT_ADDRESS)
    assert stream.status == 200, stream.headers
    (hello,) = stream.take(1)
    assert hello.event == "connection"
    return stream


# (1) No buffering ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_each_event_reaches_the_client_through_nginx_as_soon_as_it_is_posted(start_server, start_nginx, https_api,
                                                                              certificate):
    server = start_server(SSE_HEARTBEAT_SECONDS="15", TRUSTED_PROXIES="1")
    front = start_nginx([server])
    api = https_api(front)
    cid = api.create()
    # Asking for gzip: nginx must not compress (and so hold back) the stream.
    stream = stream_through(front, certificate[0], cid, api.key, {"Accept-Encoding": "gzip"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in stream.headers
    delays = []
    for n in range(20):
        posted = time.monotonic()
        assert api.post(cid, f"m{n}") == n
        (event,) = stream.take(1, timeout=10)
        delays.append(time.monotonic() - posted)
        assert event.id == str(n) and event.json()["content"] == f"m{n}"
    # The next heartbeat is 15 s away: an event that waited in a buffer would take that long.
    assert max(delays) < 2, [round(d, 3) for d in delays]


# (2) Heartbeats and proxy_read_timeout ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_heartbeats_keep_an_idle_stream_open_past_the_read_timeout(start_server, start_nginx, https_api, certificate):
    quiet = start_server(SSE_HEARTBEAT_SECONDS="15")
    beating = start_server(SSE_HEARTBEAT_SECONDS="1")
    quiet_front = start_nginx([quiet], stream_read_timeout="3s")
    beating_front = start_nginx([beating], stream_read_timeout="3s")
    api = https_api(beating_front)
    cid = api.create()

    # The 3 s are real: a stream silent for longer is cut by nginx.
    cut = stream_through(quiet_front, certificate[0], cid, api.key)
    idle_since = time.monotonic()
    assert cut.ended(timeout=15)
    assert 2.5 < time.monotonic() - idle_since < 8

    stream = stream_through(beating_front, certificate[0], cid, api.key)
    opened, pings = time.monotonic(), 0
    for item in stream.events(timeout=3, comments=True):
        pings += item.comment == "ping"
        if time.monotonic() - opened > 6.5:
            break
    assert time.monotonic() - opened > 6.5, f"the stream ended after {time.monotonic() - opened:.1f} s"
    assert pings >= 5
    assert api.post(cid, "still there") == 0
    (event,) = stream.take(1, timeout=5)
    assert event.id == "0"


# (3) Last-Event-ID -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_last_event_id_passes_through_nginx(start_server, start_nginx, https_api, certificate):
    front = start_nginx([start_server()])
    api = https_api(front)
    cid = api.create()
    for n in range(5):
        api.post(cid, f"m{n}")
    stream = open_tls_stream(front.https_port, SSE.format(cid), tls_context(certificate[0]),
                             {**bearer(api.key), "Last-Event-ID": "2"})
    hello, *events = stream.take(3)
    assert hello.json()["latest_event_id"] == 2
    assert [e.id for e in events] == ["3", "4"]
    api.post(cid, "m5")
    assert [e.id for e in stream.take(1)] == ["5"]


# (4) Forwarded headers: Secure cookie, client address, Host ------------------------------------


@pytest.mark.timeout(90)
def test_behind_nginx_the_cookie_is_secure_and_the_client_address_is_the_clients(
        start_server, start_nginx, https_api, certificate, tmp_path):
    log = tmp_path / "access-behind.log"
    server = start_server(TRUSTED_PROXIES="1", ACCESS_LOG=str(log))
    front = start_nginx([server])
    api = https_api(front)
    # The client's own forwarded headers are overwritten (or appended to) by nginx, never believed.
    spoofed = {"X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "evil.example"}
    # Found in the access log by its request id (the line holds the path, never the query string).
    response = api.call("GET", "/api/conversations?limit=1", headers={**spoofed, "X-Request-ID": "probe-behind"})
    assert response.status_code == 200, response.text
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= session_cookie_attributes(response)
    assert wait_until(lambda: access_log_addresses(log, "probe-behind"), 10, what="the access log line") \
        == [CLIENT_ADDRESS]

    # The Host the browser sent reaches the app: a cookie write from this origin passes, from another not.
    origin = f"https://127.0.0.1:{front.https_port}"
    cookie = {"Cookie": response.headers["set-cookie"].split(";")[0]}
    same = api.call("POST", "/api/conversations", {}, {**cookie, **spoofed, "Origin": origin}, auth=False)
    assert same.status_code == 200, same.text
    other = api.call("POST", "/api/conversations", {}, {**cookie, "Origin": "https://evil.example"}, auth=False)
    assert other.status_code == 403, other.text

    # Plain http is never served: it sends the browser to https, on the configured host and port,
    # whatever Host the client sent.
    plain = httpx.get(f"http://127.0.0.1:{front.http_port}/api/conversations?limit=1",
                      headers={**bearer(api.key), "Host": "evil.example"}, timeout=10)
    assert plain.status_code == 308, plain.text
    assert plain.headers["location"] == f"{front.base}/api/conversations?limit=1"
    assert "set-cookie" not in plain.headers


# (5) HTTP/2: many streams on one connection ----------------------------------------------------


@pytest.mark.timeout(90)
def test_over_http2_one_connection_carries_20_concurrent_streams(start_server, start_nginx, make_key, certificate):
    server = start_server()
    front = start_nginx([server])
    count, events = 20, 5
    authority = front.base.removeprefix("https://")
    key = make_key("alice")
    connection = Http2Connection(front.https_port, ssl.create_default_context(cafile=str(certificate[0])),
                                 authority, bearer(key))
    try:
        assert connection.protocol == "h2"
        created = connection.request("POST", "/api/conversations", b"{}", "application/json")
        connection.until(lambda: connection.responses[created].ended, 15, what="the conversation created")
        assert connection.responses[created].status == 200, connection.responses[created]
        cid = json.loads(connection.responses[created].body)["conversation_id"]
        streams = [connection.request("GET", SSE.format(cid)) for _ in range(count)]
        connection.until(lambda: all(connection.responses[s].status for s in streams), 15,
                         what=f"{count} stream heads")
        assert {connection.responses[s].status for s in streams} == {200}
        connection.until(lambda: json.loads(httpx.get(server.base + "/healthz", timeout=5).text)["streams"] == count,
                         15, what=f"{count} streams open in gunicorn")
        posts = [connection.request("POST", f"/api/conversations/{cid}/events",
                                    json.dumps({"type": "user_message", "content": f"m{n}"}).encode(),
                                    "application/json") for n in range(events)]
        connection.until(lambda: all(connection.responses[p].ended for p in posts), 15, what="the posts answered")
        assert {connection.responses[p].status for p in posts} == {200}
        # And one of 200 KB (posted to gunicorn directly): 4 MB for the 20 streams, far past the
        # 64 KiB a stream may carry before its client's first window update.
        big = httpx.post(f"{server.base}/api/conversations/{cid}/events", headers=bearer(key), timeout=10,
                         json={"type": "user_message", "content": "x" * 200_000})
        assert big.status_code == 200, big.text
        connection.until(lambda: all(len(connection.responses[s].event_ids()) > events for s in streams), 15,
                         what=f"{events + 1} events on every stream")
        assert [connection.responses[s].event_ids() for s in streams] == [list(range(events + 1))] * count
        assert not any(connection.responses[s].ended or connection.responses[s].reset for s in streams)
    finally:
        connection.close()
    # nginx numbers its client connections: the create, the posts and all 20 streams shared one.
    lines = wait_until(lambda: [line for line in front.access_log() if "/api/" in line]
                       if sum("/api/sse/" in line for line in front.access_log()) == count else None,
                       10, what="the streams in nginx's access log")
    assert {line.split()[2] for line in lines} == {"HTTP/2.0"}
    assert len({line.split()[1] for line in lines}) == 1, lines
    assert len(lines) == 1 + events + count


# (6) An upstream killed mid-stream -------------------------------------------------------------


class Reader(threading.Thread):
    """One client's stream through nginx, reopened with Last-Event-ID whenever it ends, until `want` events."""

    def __init__(self, front: Nginx, cert: Path, cid: str, key: str, want: int):
        super().__init__(daemon=True)
        self.front, self.cert, self.cid, self.key, self.want = front, cert, cid, key, want
        self.ids: list[int] = []
        self.opens = 0
        self.error: BaseException | None = None

    def open(self) -> SSEStream | None:
        """A stream resumed after the last id seen; None if nginx found no server to take it yet."""
        headers = {"Last-Event-ID": str(self.ids[-1])} if self.ids else {}
        try:
            stream = open_tls_stream(self.front.https_port, SSE.format(self.cid), tls_context(self.cert),
                                     {**bearer(self.key), **headers})
        except OSError:
            return None
        if stream.status != 200:
            stream.close()
            return None
        self.opens += 1
        return stream

    def run(self) -> None:
        """Read until every event came, reconnecting as an EventSource does."""
        try:
            deadline = time.monotonic() + 60
            while len(self.ids) < self.want and time.monotonic() < deadline:
                stream = wait_until(self.open, 15, what="a stream through nginx")
                for event in stream.events(timeout=30):
                    if event.id is not None:
                        self.ids.append(int(event.id))
                        if len(self.ids) >= self.want:
                            break
                stream.close()
        except BaseException as err:  # reported by the test
            self.error = err


@pytest.mark.timeout(120)
def test_one_upstream_killed_mid_stream_its_clients_resume_on_the_other_and_lose_nothing(
        start_server, start_nginx, https_api, certificate):
    first = start_server(SSE_HEARTBEAT_SECONDS="1", TRUSTED_PROXIES="1")
    second = start_server(SSE_HEARTBEAT_SECONDS="1", TRUSTED_PROXIES="1")
    front = start_nginx([first, second])
    api = https_api(front)
    cid = api.create()
    clients, before, after = 10, 10, 30
    readers = [Reader(front, certificate[0], cid, api.key, before + after) for _ in range(clients)]
    for reader in readers:
        reader.start()

    def streams(server: Gunicorn) -> int:
        return json.loads(httpx.get(server.base + "/healthz", timeout=5).text)["streams"]

    def all_open() -> tuple[int, int] | None:
        counts = (streams(first), streams(second))
        return counts if sum(counts) == clients else None

    counts = wait_until(all_open, 20, what="every stream open")
    assert min(counts) >= 1, f"nginx sent every stream to one server: {counts}"
    for n in range(before):
        assert api.post(cid, f"m{n}", idempotency_key=f"k{n}") == n
    wait_until(lambda: all(len(r.ids) >= before for r in readers), 15, what="the first events everywhere")

    os.killpg(first.proc.pid, signal.SIGKILL)  # master and workers at once: no goodbye to any stream
    # Posts go on through nginx at once; one that met the dying server is sent again with its key.
    for n in range(before, before + after):
        assert api.post(cid, f"m{n}", idempotency_key=f"k{n}") == n
    for reader in readers:
        reader.join(60)
    for reader in readers:
        assert reader.error is None, reader.error
        assert reader.ids == list(range(before + after)), reader.ids
    assert sum(r.opens for r in readers) >= clients + counts[0], "the killed server's clients reconnected"


# (7) nginx's own configuration and answers -----------------------------------------------------


def test_nginx_drops_an_idle_upstream_connection_before_gunicorn_does():
    # A POST sent on a pooled connection just as gunicorn closes it would be a 502 (never retried).
    site = SITE_TEMPLATE.read_text()
    (upstream,) = re.findall(r"upstream openhands_app \{(.*?)\n\}", site, flags=re.S)
    (nginx_idle,) = re.findall(r"^\s*keepalive_timeout (\d+)s;", upstream, flags=re.M)
    (gunicorn_idle,) = re.findall(r"^keepalive = (\d+)$", (ROOT / "gunicorn.conf.py").read_text(), flags=re.M)
    assert int(nginx_idle) < int(gunicorn_idle)


def nginx_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """The JSON error body of API.md that nginx answered itself, checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert body["status"] == "error" and body["error"] == code and body["message"], body
    return body


@pytest.mark.timeout(60)
def test_a_body_over_nginxs_limit_gets_a_json_413_from_nginx(start_server, start_nginx, https_api):
    front = start_nginx([start_server()])
    api = https_api(front)
    cid = api.create()
    # 2 MiB, over client_max_body_size (1 MiB): gunicorn never sees it.
    response = api.http.post(f"/api/conversations/{cid}/events", content=b"x" * (2 << 20),
                             headers={**bearer(api.key), "Content-Type": "application/json"})
    nginx_error(response, 413, "payload_too_large")
    # Between the two limits, the app answers its own 413 (MAX_EVENT_BYTES, 256 KiB).
    between = api.call("POST", f"/api/conversations/{cid}/events",
                       {"type": "user_message", "content": "x" * (512 << 10)})
    assert nginx_error(between, 413, "payload_too_large")["message"] != response.json()["message"]


def raw_exchange(port: int, data: bytes, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """Raw bytes to nginx over HTTP/1.1 (over TLS with `context`); its (status, headers, body), read until it closes."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, _, v in
                                         (line.partition(":") for line in lines)}, body


@pytest.mark.timeout(60)
def test_a_request_nginx_refuses_itself_gets_a_json_error(start_server, start_nginx, make_key, certificate):
    front = start_nginx([start_server()])
    key = make_key("alice")
    get = f"GET /api/conversations HTTP/1.1\r\nHost: {front.base.removeprefix('https://')}\r\n"
    refusals = {
        "no Host header": (b"GET /api/conversations HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "bad_request"),
        "a request line that is not HTTP": (b"NOT HTTP\r\n\r\n", 400, "bad_request"),
        "a 64 KiB header": ((get + "X-Big: " + "a" * 65536 + "\r\n\r\n").encode(), 431, "headers_too_large"),
        "a 64 KiB cookie beside the key": ((get + f"Authorization: Bearer {key}\r\nCookie: c={'b' * 65536}\r\n\r\n")
                                           .encode(), 431, "headers_too_large"),
    }
    context = tls_context(certificate[0])
    cases = [(what, front.https_port, context, *case) for what, case in refusals.items()] + [
        ("a 10 KB request line", front.https_port, context, f"GET /api/conversations?x={'a' * 10_000} HTTP/1.1\r\n"
         f"Host: {front.base.removeprefix('https://')}\r\n\r\n".encode(), 414, "uri_too_long"),
        ("plain http to the https port", front.https_port, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "bad_request"),
        ("no Host header on port 80", front.http_port, None, refusals["no Host header"][0], 400, "bad_request"),
        ("a 64 KiB header on port 80", front.http_port, None,
         b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", 431, "headers_too_large"),
    ]
    for what, port, tls, data, status, code in cases:
        got, headers, body = raw_exchange(port, data, tls)
        assert (got, headers.get("content-type")) == (status, "application/json"), (what, got, body[:300])
        answer = json.loads(body)
        assert answer["status"] == "error" and answer["error"] == code and answer["message"], (what, answer)
        # nginx's own answer (one of deploy/nginx.conf's), not gunicorn's: gunicorn never saw these.
        assert answer["message"] in re.findall(r'"message":"([^"]+)"', SITE_TEMPLATE.read_text()), (what, answer)
        assert key.encode() not in body
    # Over HTTP/2 nginx 1.22 ends the whole connection for a head over the limit (GOAWAY,
    # ENHANCE_YOUR_CALM); an answer, if a later nginx sends one, must be the JSON one.
    connection = Http2Connection(front.https_port, ssl.create_default_context(cafile=str(certificate[0])),
                                 front.base.removeprefix("https://"), {**bearer(key), "x-big": "a" * 65536})
    try:
        refused = connection.request("GET", "/api/conversations")
        connection.until(lambda: connection.responses[refused].ended or connection.responses[refused].reset
                         or connection.terminated, 15, what="nginx's answer over HTTP/2")
        response = connection.responses[refused]
        if response.status is None:
            assert connection.terminated is not None, response
            assert connection.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, connection.terminated
        else:
            assert response.status in (400, 431) and response.headers["content-type"] == "application/json", response
            assert json.loads(response.body)["status"] == "error"
    finally:
        connection.close()


@pytest.mark.timeout(60)
def test_with_its_only_upstream_stopped_nginx_answers_a_json_502_with_retry_after(start_server, start_nginx,
                                                                                  https_api):
    server = start_server()
    front = start_nginx([server])
    api = https_api(front)
    server.stop()
    response = api.call("GET", "/api/conversations")
    nginx_error(response, 502, "service_unavailable")
    assert response.headers["retry-after"] == "1"


@pytest.mark.timeout(60)
def test_the_apps_own_503_passes_through_nginx_untouched(start_server, start_nginx, https_api, tmp_path):
    own_redis = RedisServer(tmp_path / "own-redis").start()
    try:
        front = start_nginx([start_server(redis_url=own_redis.url)])
        api = https_api(front)
    finally:
        own_redis.stop()
    response = api.call("GET", "/readyz", auth=False)
    # The app's code and message, not nginx's service_unavailable (proxy_intercept_errors is off).
    nginx_error(response, 503, "redis_unavailable")


@pytest.mark.timeout(60)
def test_nginxs_access_log_has_the_path_and_request_id_never_the_query_string_or_referer(
        start_server, start_nginx, https_api):
    front = start_nginx([start_server()])
    api = https_api(front)
    response = api.call("GET", "/api/conversations?limit=1&api_key=query-secret",
                        headers={"X-Request-ID": "probe-nginx-log", "Referer": "https://x.example/?t=referer-secret"})
    assert response.status_code == 200, response.text
    (line,) = wait_until(lambda: [x for x in front.access_log() if x.endswith(" probe-nginx-log")], 10,
                         what="nginx's access line")
    address, _connection, protocol, status = line.split()[:4]
    request = line.split('"')[1]
    assert (address, protocol, status, request) == (CLIENT_ADDRESS, "HTTP/1.1", "200", "GET /api/conversations")
    logs = "\n".join(front.access_log()) + (front.workdir / "debian-access.log").read_text()
    assert "secret" not in logs and "limit=" not in logs
