"""HTTP details that only a real server shows: chunked request bodies, X-Forwarded-Proto, keep-alive.

Every request here goes over a raw socket to gunicorn (gevent workers), byte for byte as written.
"""
from __future__ import annotations

import json
import socket
import time

import pytest

from app.store import conv_events_key, conv_meta_key

from .conftest import Api

LIMIT = 1024  # MAX_EVENT_BYTES of the server under test: small, so the bodies over it stay small


class Connection:
    """One client connection: requests written as given, responses read one at a time."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        """Drop the connection."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete response in time; received {self.buf[-400:]!r}")
        if self.eof:
            raise AssertionError(f"the server closed the connection mid-response; received {self.buf[-400:]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            data = None
        except ConnectionResetError:
            data = b""
        if data == b"":
            self.eof = True
        elif data:
            self.buf += data

    def _take_line(self, deadline: float) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, size: int, deadline: float) -> bytes:
        while len(self.buf) < size:
            self._fill(deadline)
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def response(self, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
        """The next response: status, headers (names lower-cased, in order), body."""
        deadline = time.monotonic() + timeout
        status = int(self._take_line(deadline).split()[1])
        headers = []
        while line := self._take_line(deadline):
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        found = dict(headers)
        if found.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._take_line(deadline).split(b";")[0], 16):
                body += self._take(size, deadline)
                assert self._take(2, deadline) == b"\r\n"
            while self._take_line(deadline):  # trailers, up to the blank line
                pass
        else:
            body = self._take(int(found.get("content-length", "0")), deadline)
        return status, headers, body


def request(method: str, path: str, key: str | None, headers: dict[str, str] | None = None,
            body: bytes | None = None, chunks: list[bytes] | None = None) -> bytes:
    """The bytes of an HTTP/1.1 request: a Content-Length body, or a chunked one sent as `chunks`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    payload = b""
    if chunks is not None:
        lines += ["Content-Type: application/json", "Transfer-Encoding: chunked"]
        payload = b"".join(b"%X\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    elif body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def pieces(data: bytes, size: int) -> list[bytes]:
    """`data` cut into chunks of `size` bytes (the last one shorter)."""
    return [data[i:i + size] for i in range(0, len(data), size)]


def action_of_size(size: int) -> bytes:
    """A valid user_message action whose JSON is exactly `size` bytes."""
    empty = json.dumps({"type": "user_message", "content": ""}, separators=(",", ":")).encode()
    body = json.dumps({"type": "user_message", "content": "x" * (size - len(empty))}, separators=(",", ":")).encode()
    assert len(body) == size
    return body


def assert_json_error(status: int, headers: list[tuple[str, str]], body: bytes, want: int, code: str) -> None:
    """A JSON error of API.md with this status and code."""
    assert status == want, body
    assert dict(headers)["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) == {"status", "error", "message"} and answer["status"] == "error"
    assert answer["error"] == code and answer["message"]
    assert b"Traceback" not in body


@pytest.fixture()
def server(start_server):
    """One gevent worker with a small MAX_EVENT_BYTES."""
    return start_server(MAX_EVENT_BYTES=str(LIMIT))


@pytest.fixture()
def api(server, make_key) -> Api:
    """A JSON client for alice."""
    return Api(server.base, make_key("alice"))


@pytest.fixture()
def conn(server):
    """A raw connection to the server, closed after the test."""
    connection = Connection(server.port)
    yield connection
    connection.close()


def stored(api: Api, cid: str) -> list[dict]:
    """The conversation's events, from the REST listing."""
    status, listing, _ = api.call("GET", f"/api/conversations/{cid}/events")
    assert status == 200
    return listing["events"]


def assert_nothing_stored(redis_client, api: Api, cid: str) -> None:
    """The conversation still has no event: in the listing, and in Redis itself."""
    assert stored(api, cid) == []
    assert redis_client.xlen(conv_events_key(cid)) == 0
    assert redis_client.hget(conv_meta_key(cid), "last_event_id") == b"-1"


# Chunked request bodies -------------------------------------------------------------------------


def test_a_chunked_action_is_stored(api, conn):
    cid = api.create()
    body = json.dumps({"type": "user_message", "content": "chunked héllo", "extra": {"k": [1, 2]}}).encode()
    conn.send(request("POST", f"/api/conversations/{cid}/events", api.key, chunks=pieces(body, 7)))
    status, headers, answer = conn.response()
    assert status == 200, answer
    assert dict(headers)["content-type"] == "application/json"
    assert json.loads(answer) == {"status": "ok", "success": True, "event_id": 0}
    (event,) = stored(api, cid)
    assert event["id"] == 0 and event["source"] == "user"
    assert event["content"] == "chunked héllo" and event["extra"] == {"k": [1, 2]}


def test_a_chunked_body_of_exactly_the_limit_is_taken(api, conn):
    cid = api.create()
    conn.send(request("POST", f"/api/conversations/{cid}/events", api.key, chunks=pieces(action_of_size(LIMIT), 100)))
    status, _, answer = conn.response()
    assert status == 200, answer
    assert [e["id"] for e in stored(api, cid)] == [0]


@pytest.mark.parametrize("size", [LIMIT + 1, 64 * LIMIT])
def test_a_chunked_body_over_the_limit_is_a_json_413_and_stores_nothing(api, conn, redis_client, size):
    cid = api.create()
    conn.send(request("POST", f"/api/conversations/{cid}/events", api.key, chunks=pieces(action_of_size(size), 100)))
    assert_json_error(*conn.response(), 413, "payload_too_large")
    assert_nothing_stored(redis_client, api, cid)
    # The rest of the body is never read as a request: the connection either serves the next one
    # correctly or is closed.
    try:
        conn.send(request("GET", f"/api/conversations/{cid}", api.key))
        status, _, answer = conn.response()
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed
    except AssertionError:
        assert conn.eof, "neither an answer nor a closed connection"
    else:
        assert status == 200 and json.loads(answer)["conversation_id"] == cid
    assert_nothing_stored(redis_client, api, cid)


@pytest.mark.parametrize("body", [
    b'{"type": "user_message", "content": "unterminated',
    b'{"type": "user_message", "content": "x",}',
    b"not json at all",
    b"[1, 2, 3]",
])
def test_a_chunked_body_that_is_not_a_json_object_is_a_json_400(api, conn, redis_client, body):
    cid = api.create()
    conn.send(request("POST", f"/api/conversations/{cid}/events", api.key, chunks=pieces(body, 5)))
    assert_json_error(*conn.response(), 400, "invalid_json")
    assert_nothing_stored(redis_client, api, cid)


# X-Forwarded-Proto and the session cookie -----------------------------------------------------


def session_cookie_attributes(headers: list[tuple[str, str]]) -> set[str]:
    """The attributes of the one session cookie set, lower-cased (the name=value pair left out)."""
    (cookie,) = [value for name, value in headers if name == "set-cookie" and value.startswith("oh_session=")]
    return {part.strip().lower() for part in cookie.split(";")[1:]}


def test_x_forwarded_proto_https_from_a_peer_in_forwarded_allow_ips_makes_the_cookie_secure(start_server, make_key):
    # gunicorn.conf.py trusts no peer unless FORWARDED_ALLOW_IPS names it (gunicorn's own default is loopback).
    server = start_server(MAX_EVENT_BYTES=str(LIMIT), FORWARDED_ALLOW_IPS="127.0.0.1")
    conn = Connection(server.port)
    try:
        conn.send(request("GET", "/api/conversations", make_key("alice"), {"X-Forwarded-Proto": "https"}))
        status, headers, answer = conn.response()
    finally:
        conn.close()
    assert status == 200, answer
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= session_cookie_attributes(headers)


def test_x_forwarded_proto_from_loopback_is_ignored_by_default(api, conn):
    conn.send(request("GET", "/api/conversations", api.key, {"X-Forwarded-Proto": "https"}))
    status, headers, answer = conn.response()
    assert status == 200, answer
    assert "secure" not in session_cookie_attributes(headers)


def test_without_x_forwarded_proto_the_cookie_is_not_secure(api, conn):
    conn.send(request("GET", "/api/conversations", api.key))
    status, headers, answer = conn.response()
    assert status == 200, answer
    attributes = session_cookie_attributes(headers)
    assert {"httponly", "samesite=lax", "path=/"} <= attributes
    assert "secure" not in attributes


def test_x_forwarded_proto_from_an_untrusted_peer_is_ignored(start_server, make_key):
    server = start_server(MAX_EVENT_BYTES=str(LIMIT), FORWARDED_ALLOW_IPS="192.0.2.1")
    conn = Connection(server.port)
    try:
        conn.send(request("GET", "/api/conversations", make_key("alice"), {"X-Forwarded-Proto": "https"}))
        status, headers, answer = conn.response()
    finally:
        conn.close()
    assert status == 200, answer
    attributes = session_cookie_attributes(headers)
    assert {"httponly", "samesite=lax", "path=/"} <= attributes
    assert "secure" not in attributes


# Keep-alive -----------------------------------------------------------------------------------


def test_two_posts_on_one_kept_alive_connection_get_two_correct_answers(api, conn):
    cid = api.create()
    path = f"/api/conversations/{cid}/events"
    keep = {"Connection": "keep-alive"}
    first = json.dumps({"type": "user_message", "content": "one"}).encode()
    second = json.dumps({"action": "message", "args": {"content": "two"}}).encode()
    conn.send(request("POST", path, api.key, keep, body=first))
    status, headers, answer = conn.response()
    assert status == 200, answer
    assert json.loads(answer) == {"status": "ok", "success": True, "event_id": 0}
    assert dict(headers).get("connection", "").lower() != "close"
    conn.send(request("POST", path, api.key, keep, chunks=pieces(second, 9)))  # the same socket
    status, _, answer = conn.response()
    assert status == 200, answer
    assert json.loads(answer) == {"status": "ok", "success": True, "event_id": 1}
    assert [(e["id"], e.get("content") or e["args"]["content"]) for e in stored(api, cid)] == [(0, "one"), (1, "two")]


def test_two_pipelined_posts_get_two_answers_in_order(api, conn):
    cid = api.create()
    path = f"/api/conversations/{cid}/events"
    bodies = [json.dumps({"type": "user_message", "content": c}).encode() for c in ("a", "b")]
    conn.send(b"".join(request("POST", path, api.key, {"Connection": "keep-alive"}, body=b) for b in bodies))
    answers = [conn.response() for _ in bodies]
    assert [(s, json.loads(b)["event_id"]) for s, _, b in answers] == [(200, 0), (200, 1)]
    assert [e["content"] for e in stored(api, cid)] == ["a", "b"]
