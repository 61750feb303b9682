"""Hostile requests against a real gunicorn (gevent workers): a clear 4xx or a closed connection, never a 500.

Never a stuck worker either, and no slow client keeps a connection slot past its bound.

Who answers what: gunicorn itself refuses what it cannot parse (a bad request line, raw non-ASCII
bytes in the path or query, a bad header, a bad Content-Length or Transfer-Encoding: its own
`400`, `414` for a request line over 4094 bytes, `431` for over 100 headers or one over 8190
bytes; as API.md's JSON error, not gunicorn's HTML page, and the connection closes). Everything
else reaches the app and gets the JSON
errors of API.md: `413 payload_too_large`, `400 invalid_json`, `400 invalid_body` (broken chunked
framing, a body that ended early), `408 request_timeout` (a body slower than
REQUEST_BODY_TIMEOUT_SECONDS). A head slower than gunicorn's `keepalive` (5 s) is closed unanswered.
A client that takes none of a response for RESPONSE_WRITE_TIMEOUT_SECONDS is reset (event streams
excepted: the hub ends those); gunicorn's refusals never log or echo a header line or value.
"""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

from .conftest import Api
from .servers import wait_until
from .sse_client import open_stream
from .test_gunicorn_http import request

LIMIT = 262_144  # the default MAX_EVENT_BYTES: the deep-nesting bodies below fit under it
HEAD_BOUND = 5  # gunicorn.conf.py's keepalive: the whole head must be in by then
BODY_BOUND = 1.5  # REQUEST_BODY_TIMEOUT_SECONDS of the servers that test it


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes on a new connection; (status or None if closed unanswered, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = b""
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all was sent: the answer (if any) is still to be read
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
        else:
            raise AssertionError(f"no answer and no close within {timeout}s")
    finally:
        sock.close()
    if not received:
        return None, {}, b""
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_json(status: int | None, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    """The app's JSON error (API.md), with this status and code."""
    assert status == want, (status, body[:300])
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) == {"status", "error", "message"} and answer["error"] == code, answer


REFUSAL_CODES = {400: "bad_request", 414: "uri_too_long", 431: "headers_too_large"}


def assert_gunicorn_refusal(status: int | None, headers: dict[str, str], body: bytes, want: int) -> None:
    """Gunicorn's own refusal: this 4xx as API.md's JSON error, and the connection closed after it."""
    assert_json(status, headers, body, want, REFUSAL_CODES[want])
    assert headers.get("connection", "").lower() == "close"
    assert headers.get("x-content-type-options") == "nosniff"


def post_head(key: str, path: str = "/api/conversations", extra: str = "") -> bytes:
    """The head of a JSON POST (its framing headers in `extra`)."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def count_conversations(api: Api) -> int:
    """How many conversations alice has."""
    status, listing, _ = api.call("GET", "/api/conversations?limit=100")
    assert status == 200
    return len(listing["results"])


@pytest.fixture()
def server(start_server):
    """One gevent worker with the default body limit and a short body bound."""
    return start_server(REQUEST_BODY_TIMEOUT_SECONDS=str(BODY_BOUND))


@pytest.fixture()
def api(server, make_key) -> Api:
    """Alice on `server`."""
    return Api(server.base, make_key("alice"))


# Bodies ---------------------------------------------------------------------------------------


def test_bodies_over_the_limit_too_deep_or_not_utf8_are_json_4xx_and_store_nothing(server, api):
    port, key = server.port, api.key
    cid = api.create()
    events = f"/api/conversations/{cid}/events"
    # Declared over the limit: refused before a byte of it is read (a client need not send it).
    for length in (LIMIT + 1, 10**12, 10**30):
        assert_json(*exchange(port, post_head(key, events, f"Content-Length: {length}\r\n")), 413, "payload_too_large")
    over = b'{"type":"note","x":"' + b"y" * LIMIT + b'"}'
    assert_json(*exchange(port, post_head(key, events, f"Content-Length: {len(over)}\r\n") + over), 413,
                "payload_too_large")
    bad = {
        "100,000 [": b"[" * 100_000,
        "50,000 {": b'{"a":' * 50_000,
        "nested past what is stored": b'{"type":"note","v":' + b"[" * 300 + b"]" * 300 + b"}",
        "invalid UTF-8": b'{"type":"note","v":"\xff\xfe"}',
        "overlong UTF-8": b'{"type":"note","v":"\xc0\xaf"}',
        "a surrogate in UTF-8": b'{"type":"note","v":"\xed\xa0\x80"}',
        "NUL outside a string": b'{"type":"note"}\x00',
    }
    for what, body in bad.items():
        status, headers, answer = exchange(port, post_head(key, events, f"Content-Length: {len(body)}\r\n") + body)
        assert (status, json.loads(answer)["error"]) == (400, "invalid_json"), what
    status, listing, _ = api.call("GET", events)
    assert status == 200 and listing["events"] == []


def test_broken_or_short_body_framing_is_a_400_never_a_500_and_not_acted_on(server, api):
    port, key = server.port, api.key
    chunked = "Transfer-Encoding: chunked\r\n"
    cases = {
        "a chunk size that is not hex": b"ZZ\r\n{}\r\n0\r\n\r\n",
        "a negative chunk size": b"-2\r\n{}\r\n0\r\n\r\n",
        "an empty chunk size": b"\r\n{}\r\n0\r\n\r\n",
        "a chunk longer than its size": b"1\r\n{}\r\n0\r\n\r\n",
        "a bad chunk extension": b"2;\x01\r\n{}\r\n0\r\n\r\n",
        "a bad trailer": b"2\r\n{}\r\n0\r\nbad trailer\r\n\r\n",
    }
    for what, body in cases.items():
        status, headers, answer = exchange(port, post_head(key, extra=chunked) + body)
        assert_json(status, headers, answer, 400, "invalid_body")
        assert headers["connection"] == "close", what  # where a next request would start is unknown
    # Framing gunicorn cannot make sense of, before the app is called: its own 400.
    for extra in ("Content-Length: -1\r\n", "Content-Length: abc\r\n", "Content-Length: 2\r\nContent-Length: 3\r\n",
                  "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding: gzip\r\n"):
        assert_gunicorn_refusal(*exchange(server.port, post_head(api.key, extra=extra) + b"{}"), 400)
    # A body cut short by a client that stopped sending: before the bound, gunicorn handed the
    # app the bytes that came, and `{}` of a declared 1000 created a conversation.
    for extra, body in (("Content-Length: 1000\r\n", b"{}"), ("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n")):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(post_head(api.key, extra=extra) + body)
            sock.shutdown(socket.SHUT_WR)  # the client is done sending: the body ends early
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b'"error":"invalid_body"' in answer
    assert count_conversations(api) == 0


# Heads ----------------------------------------------------------------------------------------


def test_invalid_utf8_and_huge_heads_get_a_clear_4xx(server, api):
    port, key = server.port, api.key
    cid = api.create()

    def get(target: bytes, headers: bytes = b"") -> bytes:
        return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n" + headers \
            + b"Connection: close\r\n\r\n"

    # Raw bytes that are not ASCII in the request line: gunicorn's 400.
    # A query string split off by a no-break space (latin-1 0xA0) or a tab is still one.
    for target in (b"/api/conversations/\xff\xfe", b"/api/conversations?limit=\xff&key=ohk_secret_in_query",
                   b"/api/sse/conversations/\xc3(/events", b"/api/conversations?limit=1\xa0key=ohk_secret_in_query",
                   b"/api/conversations?limit=1\tkey=ohk_secret_in_query"):
        status, headers, answer = exchange(port, get(target))
        assert_gunicorn_refusal(status, headers, answer, 400)
        assert "Invalid HTTP request line" in json.loads(answer)["message"] and b"ohk_secret" not in answer
    # gunicorn logs the line it refused, but never its query string (where a careless client puts keys).
    wait_until(lambda: "/api/sse/conversations/" in server.log(), 5, what="gunicorn's log line")
    assert "Invalid HTTP request line" in server.log() and "ohk_secret_in_query" not in server.log()
    # Percent-encoded, they reach the app (decoded with replacement characters): JSON.
    assert_json(*exchange(port, get(b"/api/conversations/%ff%fe")), 404, "not_found")
    assert_json(*exchange(port, get(b"/api/conversations?limit=%ff")), 400, "bad_request")
    assert_json(*exchange(port, get(f"/api/conversations/{cid}/events?start_id=%c3%28".encode())), 400, "bad_request")
    assert_json(*exchange(port, get(f"/api/sse/conversations/{cid}/events?latest_event_id=%ed%a0%80".encode())), 400,
                "bad_request")
    # Header values are bytes to HTTP (read as latin-1): the app checks them like any other.
    sse_path = f"/api/sse/conversations/{cid}/events".encode()
    assert_json(*exchange(port, get(sse_path, b"Last-Event-ID: \xff\xfe\r\n")), 400, "bad_request")
    assert_json(*exchange(port, get(b"/api/conversations", b"Authorization: Bearer \xff\xfe\r\n")), 401, "unauthorized")
    body = b'{"type":"note"}'
    idem = post_head(key, f"/api/conversations/{cid}/events", f"Content-Length: {len(body)}\r\n").replace(
        b"\r\n\r\n", b"\r\nIdempotency-Key: \xff\xfe\r\n\r\n") + body
    assert_json(*exchange(port, idem), 400, "bad_request")
    status, _, _ = exchange(port, get(b"/api/conversations", b"X-Anything: \xff\xfe\r\n"))
    assert status == 200  # a header nobody reads is nobody's problem
    # A control character in a header, and sizes over gunicorn's limits: its own 400, 431, 414.
    assert_gunicorn_refusal(*exchange(port, get(b"/api/conversations", b"X-A: a\x00b\r\n")), 400)
    status, headers, answer = exchange(port, get(b"/api/conversations", b"X-Big: " + b"a" * 1_000_000 + b"\r\n"))
    assert_gunicorn_refusal(status, headers, answer, 431)
    assert b"aaaa" not in answer
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    assert_gunicorn_refusal(*exchange(port, get(b"/api/conversations", many)), 431)
    assert_gunicorn_refusal(*exchange(port, get(b"/api/conversations?x=" + b"a" * 100_000)), 414)
    assert_gunicorn_refusal(*exchange(port, get(b"/" + b"a" * 1_000_000)), 414)
    status, _, _ = exchange(port, get(b"/api/conversations"))
    assert status == 200  # and the worker still answers
    status, listing, _ = api.call("GET", f"/api/conversations/{cid}/events")
    assert status == 200 and listing["events"] == []


# Slow clients ---------------------------------------------------------------------------------


class Trickler:
    """A client that sends its request a byte at a time, one a second, and never finishes (unless cut)."""

    def __init__(self, port: int, first: bytes, rest: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(first)
        self.rest = rest
        self.next_at = time.monotonic() + 1
        self.received = b""
        self.closed = False

    def tick(self) -> None:
        """Send the next byte when due; read what has come; note a close."""
        if self.closed:
            return
        now = time.monotonic()
        if now >= self.next_at and self.rest:
            try:
                self.sock.send(self.rest[:1])
            except OSError:
                pass  # closed under us: the recv below sees it
            self.rest, self.next_at = self.rest[1:], now + 1
        self.sock.settimeout(0.02)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            data = b""  # reset: the server closed with our byte unread
        if data:
            self.received += data
        else:
            self.closed = True
            self.sock.close()

    def close(self) -> None:
        """Drop the connection."""
        self.sock.close()


def answered_while_trickling(port: int, tricklers: list[Trickler], request_bytes: bytes, timeout: float) -> bytes:
    """Send a normal request on a new connection while the tricklers go on; its answer (once complete)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_bytes)
    sock.settimeout(0.02)
    answer = b""
    deadline = time.monotonic() + timeout
    try:
        while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
            assert time.monotonic() < deadline, f"a normal request got no answer within {timeout}s"
            for trickler in tricklers:
                trickler.tick()
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                pass
    finally:
        sock.close()
    return answer


@pytest.mark.timeout(60)
def test_slow_bodies_get_a_json_408_and_free_their_slots(start_server, make_key):
    # Three connection slots; five clients sending their bodies a byte a second. Without a bound
    # they would hold every slot for good, and the normal request below would never be answered.
    server = start_server(WORKER_CONNECTIONS="3", REQUEST_BODY_TIMEOUT_SECONDS=str(BODY_BOUND))
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    slow = [Trickler(server.port, post_head(api.key, f"/api/conversations/{cid}/events", "Content-Length: 1000\r\n")
                     + b'{"type":"note","x":"', b"y" * 1000) for _ in range(4)]
    slow.append(Trickler(server.port, post_head(api.key, extra="Transfer-Encoding: chunked\r\n") + b"2\r\n{}\r\n", b""))
    try:
        answer = answered_while_trickling(server.port, slow, request("GET", "/api/conversations", api.key), timeout=20)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        wait_until(lambda: [t.tick() for t in slow] and all(t.closed for t in slow), 20, 0.01,
                   what="every slow body ended")
    finally:
        for trickler in slow:
            trickler.close()
    for trickler in slow:
        status, _, rest = trickler.received.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower(), trickler.received[:300]
        assert json.loads(rest)["error"] == "request_timeout"
    status, listing, _ = api.call("GET", f"/api/conversations/{cid}/events")
    assert status == 200 and listing["events"] == []
    assert count_conversations(api) == 1


@pytest.mark.timeout(60)
def test_slow_heads_are_closed_after_the_keepalive_bound_and_free_their_slots_but_streams_go_on(start_server,
                                                                                                  make_key):
    # Three slots: an event stream and two slowloris heads fill them, a third head and a normal
    # request wait. The heads are closed unanswered once the bound passes, the normal request is
    # answered, and the stream (a long response, not a slow request) is not cut by either bound.
    server = start_server(WORKER_CONNECTIONS="3", REQUEST_BODY_TIMEOUT_SECONDS="1")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    events = open_stream(server.port, f"/api/sse/conversations/{cid}/events", {"Authorization": f"Bearer {api.key}"})
    assert events.status == 200 and events.take(1)[0].event == "connection"
    started = time.monotonic()
    slow = [Trickler(server.port, b"GET /api/conversations HTTP/1.1\r\n", b"X-Slow: " + b"z" * 100) for _ in range(3)]
    try:
        answer = answered_while_trickling(server.port, slow, request("GET", "/api/conversations", api.key), timeout=30)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert time.monotonic() - started >= HEAD_BOUND - 0.5  # it waited for a slot: the slots really were full
        # The two that held slots are closed by now; the third took a slot at the same time as the
        # normal request, and would be closed a bound later by the same timer (not waited for).
        wait_until(lambda: [t.tick() for t in slow] and sum(t.closed for t in slow) >= 2, 5, 0.01,
                   what="the two slow heads that held slots closed")
    finally:
        for trickler in slow:
            trickler.close()
    assert all(t.received == b"" for t in slow)  # closed unanswered, as gunicorn does for an idle keep-alive
    api.post(cid, type="note")
    (event,) = events.take(1)
    assert event.id == "0" and event.json()["type"] == "note"
    assert time.monotonic() - started > HEAD_BOUND  # the stream outlived both bounds


# Clients that never read ---------------------------------------------------------------------

WRITE_BOUND = 2  # RESPONSE_WRITE_TIMEOUT_SECONDS of the servers that test it
BIG = 250_000  # bytes of each event's payload: 40 of them (10 MB) are far more than socket buffers hold
BIG_EVENTS = 40


def stuffed_conversation(api: Api) -> str:
    """A conversation of BIG_EVENTS events of BIG bytes each."""
    cid = api.create()
    for _ in range(BIG_EVENTS):
        api.post(cid, type="note", x="y" * BIG)
    return cid


def tiny_window_client(port: int, request_bytes: bytes) -> socket.socket:
    """A connection with a 4 KB receive buffer that has sent `request_bytes` (and reads only when told)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_bytes)
    return sock


def answer_started(sock: socket.socket) -> bool:
    """Whether the server has begun to answer on `sock` (nothing is taken from it)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(10)


def read_until(sock: socket.socket, done, timeout: float) -> tuple[bytes, bool]:
    """Read until `done(data)`, EOF or a reset; (what came, whether the connection ended)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        assert time.monotonic() < deadline, f"neither done nor closed within {timeout}s ({len(data)} bytes)"
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


@pytest.mark.timeout(90)
def test_clients_that_never_read_a_response_are_cut_and_free_their_slots_but_streams_are_not(start_server, make_key):
    # Four slots: a stream and three listings of 10 MB, none read. Without the bound they hold every
    # slot (and the listings in memory) for good, and the normal request below is never answered.
    server = start_server(WORKER_CONNECTIONS="4", RESPONSE_WRITE_TIMEOUT_SECONDS=str(WRITE_BOUND))
    api = Api(server.base, make_key("alice"))
    cid = stuffed_conversation(api)
    stream = tiny_window_client(server.port, (f"GET /api/sse/conversations/{cid}/events HTTP/1.0\r\nHost: x\r\n"
                                              f"Authorization: Bearer {api.key}\r\n\r\n").encode())
    stalled = []
    try:
        wait_until(lambda: answer_started(stream), 10, what="the stream's first bytes")
        stalled = [tiny_window_client(server.port, request("GET", f"/api/conversations/{cid}/events?limit=1000",
                                                           api.key)) for _ in range(3)]
        wait_until(lambda: all(answer_started(s) for s in stalled), 10, what="the listings' first bytes")
        status, _, _ = exchange(server.port, request("GET", "/api/conversations", api.key), timeout=WRITE_BOUND + 20)
        assert status == 200
        # It waited for a slot that a cut freed: the slots really were full (a log line of the guard's, before).
        assert "cut: the client took under" in server.log()
        wait_until(lambda: server.log().count("cut: the client took under") >= 3, WRITE_BOUND + 10,
                   what="the three listings cut")
        for sock in stalled:  # what each reads ends (a reset) long before the 10 MB listing
            data, ended = read_until(sock, lambda data: False, 10)
            assert ended and len(data) < BIG * BIG_EVENTS / 2, len(data)
        assert "Traceback" not in server.log() and "[ERROR]" not in server.log()
        # The stream, unread as long, is whole: every stored event comes once it is read.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a window no longer tiny: read quicker
        data, ended = read_until(stream, lambda data: b"\nid: %d\n" % (BIG_EVENTS - 1) in data, 30)
        assert not ended
        assert re.findall(rb"^id: (\d+)$", data, re.M) == [b"%d" % i for i in range(BIG_EVENTS)]
        assert server.log().count("cut: the client took under") == 3
    finally:
        for sock in [stream, *stalled]:
            sock.close()


@pytest.mark.timeout(60)
def test_a_slow_reader_is_never_cut(start_server, make_key):
    bound = 3
    server = start_server(RESPONSE_WRITE_TIMEOUT_SECONDS=str(bound))
    api = Api(server.base, make_key("alice"))
    cid = stuffed_conversation(api)
    sock = tiny_window_client(server.port, request("GET", f"/api/conversations/{cid}/events?limit=1000", api.key))
    try:
        data = b""
        slow_until = time.monotonic() + 2 * bound
        while time.monotonic() < slow_until:  # a few KB a second, for twice the bound
            data += sock.recv(65536)
            time.sleep(bound / 3)  # the client's pace, not a wait for the server
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        assert len(body) < length / 2  # the server was still writing the whole time
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a window no longer tiny: read quicker
        data, ended = read_until(sock, lambda data: len(body) + len(data) >= length, 30)
        listing = json.loads(body + data)
        assert [event["id"] for event in listing["events"]] == list(range(BIG_EVENTS))
    finally:
        sock.close()
    assert "cut: the client took under" not in server.log()


def test_a_header_line_gunicorn_refuses_is_never_logged_nor_answered(server, make_key):
    key = make_key("alice")  # a real key: the end-of-run log audit looks for its secret in this server's log too
    secret = key.split("_", 2)[2].encode()  # ohk_<key id>_<secret>: the secret may hold `_` itself
    get = "GET /api/conversations HTTP/1.1\r\nHost: x\r\n"
    heads = {
        "a header line with no colon": f"{get}Authorization Bearer {key}\r\n",
        "a key alone on a line": f"{get}{key}\r\n",
        "a header name with a space": f"{get}Authorization Bearer {key}: x\r\n",
        "a key in a header name": f"{get}{key}\x01: x\r\n",
        "a folded line": f"{get}Authorization: Bearer\r\n {key}\r\n",
        "a control character in the value": f"{get}Authorization: Bearer {key}\x7f\r\n",
        "a key as the method": f"{key}! /api/conversations HTTP/1.1\r\nHost: x\r\n",
        "a key as the request line": f"{key}\r\nHost: x\r\n",
        "a key after a no-break space": f"GET /api/conversations\xa0{key} HTTP/1.1\r\nHost: x\r\n",
        "a key as the version": f"GET /api/conversations {key}\r\nHost: x\r\n",
        "a key as Expect": f"{get}Expect: {key}\r\n",
        "a key as the transfer coding": f"POST /api/conversations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {key}\r\n",
    }
    for what, head in heads.items():
        status, headers, body = exchange(server.port, (head + "\r\n").encode("latin-1"))
        assert status in (400, 417, 501), (what, status, body[:300])
        assert secret not in body, what
        codes = {**REFUSAL_CODES, 417: "expectation_failed", 501: "not_implemented"}
        assert_json(status, headers, body, status, codes[status])
    wait_until(lambda: server.log().count("Invalid request from") >= len(heads), 5, what="gunicorn's log lines")
    log = server.log()
    assert secret.decode() not in log and "Invalid HTTP Header: '<" in log
