"""The SSE stream against a real gunicorn with gevent workers on a real Redis, over real sockets."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from .conftest import Api, bearer
from .servers import wait_until
from .sse_client import SSEStream, open_stream, recv_before

SSE = "/api/sse/conversations/{}/events"


def stream_count(server) -> int:
    """Open streams in the (single) worker, from /healthz."""
    with urllib.request.urlopen(server.base + "/healthz", timeout=5) as resp:
        return json.loads(resp.read())["streams"]


def test_stream_opens_then_sends_backlog_live_events_and_pings(server, api):
    cid = api.create(initial_user_msg="first")
    api.post(cid, type="user_message", content="second")
    stream = open_stream(server.port, SSE.format(cid) + "?providers_set=gitlab,github,,github", bearer(api.key))
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    first = stream.take(1)[0]
    assert stream.retry == 3000
    assert first.event == "connection"
    assert first.retry == 3000, "retry: goes in the connection event's block"
    hello = first.json()
    assert hello["type"] == "connection_established"
    assert hello["conversation_id"] == cid
    assert hello["latest_event_id"] == -1
    assert hello["providers_set"] == ["github", "gitlab"]
    assert hello["connection_id"]
    backlog = stream.take(2)
    assert [e.id for e in backlog] == ["0", "1"]
    assert [e.event for e in backlog] == ["message", "message"]
    assert backlog[0].json()["content"] == "first"
    assert backlog[0].json()["source"] == "user"
    api.post(cid, type="user_message", content="live", extra={"k": [1, 2]})
    live = stream.take(1)[0]
    assert live.id == "2"
    assert live.json()["extra"] == {"k": [1, 2]}
    # Idle: a comment within one heartbeat (1 s here); 5 s leaves room for a loaded machine.
    idle = next(stream.events(timeout=5, comments=True), None)
    assert idle is not None and idle.comment == "ping"
    # The opening and the ping are framed so that no blank line ends an empty block.
    assert stream.empty_blocks == 0
    stream.close()


def test_stream_event_matches_rest_listing(server, api):
    cid = api.create()
    api.post(cid, action="message", args={"content": "héllo", "image_urls": []}, note=None)
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    events = stream.take(2)
    status, listing, _ = api.call("GET", f"/api/conversations/{cid}/events")
    assert status == 200
    assert events[1].json() == listing["events"][0]
    stream.close()


def test_last_event_id_header_wins_over_query(server, api):
    cid = api.create()
    for i in range(4):
        api.post(cid, type="user_message", content=f"m{i}")
    stream = open_stream(server.port, SSE.format(cid) + "?latest_event_id=0", {**bearer(api.key), "Last-Event-ID": "1"})
    hello, *events = stream.take(3)
    assert hello.json()["latest_event_id"] == 1
    assert [e.id for e in events] == ["2", "3"]
    stream.close()


@pytest.mark.parametrize("query,headers", [
    ("?latest_event_id=-2", {}),
    ("?latest_event_id=abc", {}),
    ("?latest_event_id=1.5", {}),
    ("?providers_set=github,nope", {}),
    ("", {"Last-Event-ID": "x"}),
])
def test_bad_stream_parameters_are_400(server, api, query, headers):
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid) + query, {**bearer(api.key), **headers})
    assert stream.status == 400
    body = json.loads(stream.body)
    assert body["status"] == "error" and body["error"] and body["message"]


def test_empty_latest_event_id_means_from_the_beginning(server, api):
    cid = api.create(initial_user_msg="zero")
    stream = open_stream(server.port, SSE.format(cid) + "?latest_event_id=", bearer(api.key))
    hello, event = stream.take(2)
    assert hello.json()["latest_event_id"] == -1 and event.id == "0"
    stream.close()


def test_stream_auth_cookie_and_ownership(server, api, make_key):
    cid = api.create(initial_user_msg="mine")
    assert open_stream(server.port, SSE.format(cid)).status == 401
    assert open_stream(server.port, SSE.format(cid), {"Authorization": "Bearer nope"}).status == 401
    other = open_stream(server.port, SSE.format(cid), bearer(make_key("bob")))
    assert other.status == 404
    assert open_stream(server.port, SSE.format("no-such-id"), bearer(api.key)).status == 404
    # The cookie minted for a Bearer request is what an EventSource sends.
    _, _, headers = api.call("GET", f"/api/conversations/{cid}")
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    stream = open_stream(server.port, SSE.format(cid), {"Cookie": cookie})
    assert stream.status == 200
    assert stream.take(2)[1].json()["content"] == "mine"
    stream.close()


def test_disconnected_clients_are_freed_at_once_not_at_the_next_write(start_server, make_key):
    # A heartbeat far longer than the wait: only the socket watcher can notice the closed sockets.
    server = start_server(SSE_HEARTBEAT_SECONDS="60")
    api = Api(server.base, make_key("alice"))
    cids = [api.create() for _ in range(5)]
    streams = [open_stream(server.port, SSE.format(cids[i % 5]), bearer(api.key)) for i in range(100)]
    for s in streams:
        assert s.status == 200
        assert s.take(1)[0].event == "connection"
    assert stream_count(server) == 100
    for s in streams:
        s.close()
    # Nothing is posted and no ping is due: only the socket watcher can notice. "At once" is given
    # 10 s here, for 100 closes on a loaded machine; a write-time detection would take 60 s.
    wait_until(lambda: stream_count(server) == 0, 10, what="subscriber count back to 0")


def test_delete_ends_open_streams_within_two_seconds(server, api):
    cid = api.create(initial_user_msg="x")
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert len(stream.take(2)) == 2
    started = time.monotonic()
    assert api.call("DELETE", f"/api/conversations/{cid}")[0] == 200
    assert stream.ended(timeout=10)
    # API.md: within 2 s. The clock starts before the DELETE is sent, so it also covers that round
    # trip; + 0.5 s for this reader's own wake-up on a loaded machine (socket read, thread switch).
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 0.5, f"the stream ended {elapsed:.2f} s after the DELETE"
    assert open_stream(server.port, SSE.format(cid), bearer(api.key)).status == 404


def test_revoked_key_ends_its_streams_within_two_seconds(server, api, app):
    cid = api.create(initial_user_msg="x")
    _, _, headers = api.call("GET", f"/api/conversations/{cid}")
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    by_key = open_stream(server.port, SSE.format(cid), bearer(api.key))
    by_cookie = open_stream(server.port, SSE.format(cid), {"Cookie": cookie})
    assert len(by_key.take(2)) == 2 and len(by_cookie.take(2)) == 2
    started = time.monotonic()
    app.extensions["store"].revoke_api_key(api.key.split("_")[1])
    assert by_key.ended(timeout=10) and by_cookie.ended(timeout=10)
    # API.md: within 2 s; + 0.5 s for this reader's own wake-up on a loaded machine (as above).
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 0.5, f"the streams ended {elapsed:.2f} s after the revocation"
    assert open_stream(server.port, SSE.format(cid), {"Cookie": cookie}).status == 401


def test_streams_per_user_are_capped(start_server, make_key):
    server = start_server(SSE_MAX_STREAMS_PER_USER="2")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    first, second = (open_stream(server.port, SSE.format(cid), bearer(api.key)) for _ in range(2))
    assert first.status == second.status == 200
    third = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert third.status == 429
    assert json.loads(third.body)["error"] == "too_many_requests"
    # Another user is not affected; a closed stream gives its slot back.
    bob = Api(server.base, make_key("bob"))
    assert open_stream(server.port, SSE.format(bob.create()), bearer(bob.key)).status == 200
    first.close()
    wait_until(lambda: open_stream(server.port, SSE.format(cid), bearer(api.key)).status == 200, 10,
               what="a slot freed by a closed stream")
    second.close()


def test_retention_says_history_truncated_in_band(start_server, make_key):
    server = start_server(EVENT_RETENTION="3")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    for i in range(10):
        api.post(cid, type="user_message", content=f"m{i}")
    stream = open_stream(server.port, SSE.format(cid) + "?latest_event_id=2", bearer(api.key))
    hello, truncated, *events = stream.take(5)
    assert hello.event == "connection"
    assert truncated.event == "history_truncated"
    assert truncated.json() == {"earliest_event_id": 7}
    assert [e.id for e in events] == ["7", "8", "9"]
    stream.close()
    # Resuming from a kept id says nothing of truncation.
    stream = open_stream(server.port, SSE.format(cid) + "?latest_event_id=7", bearer(api.key))
    assert [e.id for e in stream.take(3)[1:]] == ["8", "9"]
    stream.close()


def test_streams_need_gevent(client, make_key):
    """Under a server that did not patch sockets (here Flask's test client) streams are refused."""
    key = make_key("alice")
    cid = client.post("/api/conversations", json={}, headers=bearer(key)).get_json()["conversation_id"]
    resp = client.get(SSE.format(cid), headers=bearer(key))
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "streaming_unavailable"


def collect(port: int, path: str, key: str, want: int, *, drops: int, stop: threading.Event, out: list,
            errors: list) -> None:
    """Follow a conversation until `want` events, reconnecting `drops` times with Last-Event-ID."""
    last = -1
    dropped = 0
    deadline = time.monotonic() + 60
    try:
        while last < want - 1 and time.monotonic() < deadline and not stop.is_set():
            headers = {**bearer(key), **({"Last-Event-ID": str(last)} if last >= 0 else {})}
            stream = open_stream(port, path, headers)
            assert stream.status == 200, stream.body
            budget = 1 + (want // (drops + 1)) if dropped < drops else want
            got = 0
            for ev in stream.events(timeout=10):
                if ev.event != "message":
                    continue
                out.append(int(ev.id))
                last = int(ev.id)
                got += 1
                if got >= budget or last >= want - 1:
                    break
            stream.close()
            dropped += 1
    except Exception as err:  # reported by the test, not swallowed
        errors.append(err)


def test_reconnects_during_concurrent_posts_deliver_every_event_exactly_once(server, make_key):
    api = Api(server.base, make_key("alice"))
    cids = [api.create() for _ in range(3)]
    per_conversation = 150
    stop = threading.Event()
    results = {(cid, n): [] for cid in cids for n in range(4)}
    errors: list = []
    readers = [threading.Thread(target=collect, args=(server.port, SSE.format(cid), api.key, per_conversation),
                                kwargs={"drops": 3 + n, "stop": stop, "out": results[(cid, n)], "errors": errors})
               for cid, n in results]
    for t in readers:
        t.start()
    posted = {cid: [] for cid in cids}

    def poster(cid: str, start: int) -> None:
        for _ in range(per_conversation // 3):
            posted[cid].append(api.post(cid, type="user_message", content="x", sent_at=time.time()))
            time.sleep(0.002)

    posters = [threading.Thread(target=poster, args=(cid, i)) for cid in cids for i in range(3)]
    for t in posters:
        t.start()
    for t in posters:
        t.join(60)
    for t in readers:
        t.join(60)
    stop.set()
    assert not errors
    for cid in cids:
        assert sorted(posted[cid]) == list(range(per_conversation))
    for (cid, n), ids in results.items():
        assert ids == list(range(per_conversation)), f"reader {n} of {cid[:6]}: {len(ids)} ids, first gap/dup shown"


def raw_request(server, head: str, key: str) -> socket.socket:
    """A socket that has sent `head` (request line and headers) with the key, for byte-level checks."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"{head}\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return sock


class RawReader:
    """Everything a socket received so far; reads stop on EOF and on a deadline, never spin."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.raw = b""
        self.eof = False

    def _read(self, deadline: float) -> bool:
        """One read, until `deadline` at most; False if none came (deadline passed, or EOF)."""
        data = None if self.eof else recv_before(self.sock, deadline)
        if data is None:
            return False
        self.eof = not data
        self.raw += data
        return bool(data)

    def until(self, done, timeout: float, what: str) -> bytes:
        """Read until `done(raw)`; fail if the server closes first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not done(self.raw):
            if self.eof or time.monotonic() >= deadline:
                state = "the server closed the connection" if self.eof else f"{timeout}s passed"
                raise AssertionError(f"{state} before {what}; received {self.raw[-600:]!r}")
            self._read(deadline)
        return self.raw

    def until_eof(self, timeout: float) -> bool:
        """Read until the server closes the connection; whether it did within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        return self.eof


SSE_LINE_STARTS = (b"retry: ", b"event: ", b"data: ", b"id: ", b": ")


def test_http_1_0_clients_get_the_stream_through_gunicorn(server, api):
    """HTTP/1.0 has no chunked encoding: the body is SSE as is, and the hub writes no chunk framing into it."""
    cid = api.create(initial_user_msg="zero")
    sock = raw_request(server, f"GET {SSE.format(cid)} HTTP/1.0", api.key)
    reader = RawReader(sock)
    reader.until(lambda raw: b"\nid: 0\n" in raw, 10, "the backlog event")
    # Posted once the stream is open: it reaches the stream through the hub's live path.
    api.post(cid, type="user_message", content="live")
    reader.until(lambda raw: b'"content":"live"}\n\n' in raw, 10, "the live event")
    # An idle stream pings (heartbeat 1 s here): the ping path writes to this socket too.
    reader.until(lambda raw: b"\n: ping\n" in raw.split(b'"content":"live"}', 1)[1], 5, "a ping after it")
    assert api.call("DELETE", f"/api/conversations/{cid}")[0] == 200
    # HTTP/1.0 has no other way to end a body: the server closes the connection.
    assert reader.until_eof(10), "the stream of the deleted conversation was not closed"
    sock.close()

    head, body = reader.raw.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.split()[1] == "200"
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    # Nothing but SSE lines in the body: a chunk-size line ("5A\r") or a chunk's CRLF would show here.
    assert b"\r" not in body, body
    lines = body.split(b"\n")
    assert lines[-1] == b"", "the body ends with a complete line"
    strays = [line for line in lines[:-1] if line and not line.startswith(SSE_LINE_STARTS)]
    assert not strays, f"lines that are not SSE (HTTP/1.1 chunk framing?): {strays!r}"
    # API.md's framing: `retry:` in the same block as the connection event; pings are bare comment lines.
    assert body.startswith(b"retry: 3000\nevent: connection\ndata: {")
    parser = SSEStream(None)
    parsed = parser.feed(body)
    events = [e for e in parsed if e.comment is None]
    hello, *stored = events
    assert hello.event == "connection" and hello.retry == 3000
    assert hello.json()["type"] == "connection_established" and hello.json()["latest_event_id"] == -1
    assert [(e.id, e.event, e.json()["content"]) for e in stored] == [("0", "message", "zero"),
                                                                      ("1", "message", "live")]
    pings = [e.comment for e in parsed if e.comment is not None]
    assert pings and set(pings) == {"ping"}
    assert parser.empty_blocks == 0, "a blank line with nothing to dispatch (an empty event to many clients)"


def test_head_gets_the_stream_headers_and_no_body(server, api):
    cid = api.create(initial_user_msg="zero")
    sock = raw_request(server, f"HEAD {SSE.format(cid)} HTTP/1.1\r\nHost: x", api.key)
    reader = RawReader(sock)
    reader.until(lambda raw: b"\r\n\r\n" in raw, 10, "the response head")
    api.post(cid, type="user_message", content="live")
    # Nothing more may come: not the live event, not a ping (heartbeat 1 s; 2.5 s leaves room for both).
    reader.until_eof(2.5)
    sock.close()
    raw = reader.raw
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream; charset=utf-8" in raw
    assert raw.split(b"\r\n\r\n", 1)[1] == b""
