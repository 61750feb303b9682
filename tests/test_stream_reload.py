"""Reloads (HUP) and exiting workers (TERM) must not end a browser's EventSource for good (issue 6, item 7).

A browser's EventSource reconnects `retry` ms after its stream ends, and it sends that request on a
kept-alive connection when the last response allowed it. If the exiting worker is still holding
that connection, it is the one that answers (`503 the worker is shutting down`), and a non-200
answer closes an EventSource for good. So a stream response must never leave its connection open
for another request. The client below behaves like that EventSource over a raw socket.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import psutil

from .conftest import Api, bearer
from .servers import Gunicorn, wait_until

SSE = "/api/sse/conversations/{}/events"
RETRY_MS = "300"  # the reconnection delay the server tells clients; short keeps the tests short


class Framing(AssertionError):
    """The bytes on the wire are not valid HTTP/1.1 chunked framing."""


@dataclass
class Answer:
    """One response the client got, and what became of its connection."""

    status: int
    headers: dict[str, str]
    reused: bool  # sent on the connection of the previous response
    served_by: int | None  # pid of the worker holding the server end, while it was open
    body: bytes = b""
    ended: str = ""  # "last-chunk" (the response completed), "eof" (connection closed), "client"
    server_closed: bool = False  # the server closed the connection right after the response


@dataclass
class Conn:
    """A client connection and the bytes read from it but not consumed yet."""

    sock: socket.socket
    buf: bytes = b""

    def fill(self, deadline: float) -> bool:
        """Read more; False on EOF (or a reset), TimeoutError past the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    def line(self, deadline: float) -> bytes | None:
        """The next CRLF-terminated line (without it), None on EOF."""
        while b"\r\n" not in self.buf:
            if not self.fill(deadline):
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, size: int, deadline: float) -> bytes | None:
        """The next `size` bytes, None on EOF."""
        while len(self.buf) < size:
            if not self.fill(deadline):
                return None
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def peer_closed(self) -> bool:
        """Whether the server has closed its end (what a browser notices before reusing a connection)."""
        self.sock.settimeout(0.0)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        """Drop it."""
        self.sock.close()


def serving_pid(server: Gunicorn, local_port: int) -> int | None:
    """The worker whose socket is connected to our `local_port` (None if no worker holds it)."""
    for pid in server.worker_pids():
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == local_port and c.laddr.port == server.port for c in conns):
            return pid
    return None


class EventSourceLike(threading.Thread):
    """Follows a conversation as a browser's EventSource does, over HTTP/1.1 keep-alive.

    - It reconnects `retry` ms after a stream ends, with `Last-Event-ID`.
    - It reuses the connection when the last response allowed it (no `Connection: close`, the
      response completed, and the server has not closed the socket), as browsers do.
    - A reused connection closed before any answer is retried on a new one (browsers do too).
    - A non-200 answer closes it for good (WHATWG: "fail the connection"): `failure`.
    """

    def __init__(self, server: Gunicorn, cid: str, key: str, want: int, budget: float = 30.0):
        super().__init__(daemon=True)
        self.server, self.path, self.key, self.want = server, SSE.format(cid), key, want
        self.deadline = time.monotonic() + budget
        self.retry = 3.0
        self.last_id: str | None = None
        self.ids: list[int] = []
        self.answers: list[Answer] = []
        self.stream_ends: list[float] = []  # when each 200 stream ended (by the server)
        self.failure: Answer | None = None
        self.error: BaseException | None = None
        self.conn: Conn | None = None
        self.stop = threading.Event()

    # The thread --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while len(self.ids) < self.want and not self.stop.is_set() and time.monotonic() < self.deadline:
                answer = self._request()
                if answer is None:  # a network error: reconnect after the delay
                    self.stop.wait(self.retry)
                    continue
                self.answers.append(answer)
                if answer.status != 200:
                    self.failure = answer
                    return
                self._follow(answer)
                if len(self.ids) < self.want:
                    self.stop.wait(self.retry)
        except BaseException as err:  # reported by the test
            self.error = err
        finally:
            self._drop()

    def local_port(self) -> int | None:
        """The client port of the current connection."""
        conn = self.conn
        try:
            return conn.sock.getsockname()[1] if conn is not None else None
        except OSError:
            return None

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _request(self) -> Answer | None:
        reused = self.conn is not None and not self.conn.peer_closed()
        if not reused:
            self._drop()
        for attempt in ("reused", "new") if reused else ("new",):
            if attempt == "new":
                self._drop()
                try:
                    self.conn = Conn(socket.create_connection(("127.0.0.1", self.server.port), timeout=5))
                except OSError:
                    return None
            headers = {"Host": f"127.0.0.1:{self.server.port}", "Accept": "text/event-stream",
                       "Cache-Control": "no-cache", **bearer(self.key)}
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id
            head = f"GET {self.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            try:
                self.conn.sock.settimeout(5)
                self.conn.sock.sendall(head.encode())
                answer = self._read_head(reused=attempt == "reused")
            except OSError:
                answer = None
            if answer is not None:
                return answer
        self._drop()
        return None

    def _read_head(self, reused: bool) -> Answer | None:
        deadline = time.monotonic() + 10
        status_line = self.conn.line(deadline)
        if status_line is None:
            return None
        headers: dict[str, str] = {}
        while True:
            line = self.conn.line(deadline)
            if line is None:
                return None
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        served_by = serving_pid(self.server, self.local_port())
        if served_by is None and reused and self.answers:
            served_by = self.answers[-1].served_by  # the same connection: the same worker
        answer = Answer(int(status_line.split()[1]), headers, reused, served_by)
        if answer.status != 200:
            answer.body = self.conn.exactly(int(headers.get("content-length", "0")), deadline) or b""
            self._after(answer, completed=True)
        return answer

    def _follow(self, answer: Answer) -> None:
        """Read the stream until it ends, dispatching events; then keep or drop the connection."""
        assert answer.headers.get("content-type", "").startswith("text/event-stream"), answer.headers
        assert answer.headers.get("transfer-encoding", "").lower() == "chunked", answer.headers
        text = b""
        pending_id: str | None = None
        has_data = False
        while len(self.ids) < self.want and not self.stop.is_set():
            data = self._chunk()
            if data is None:  # the response is over
                self.stream_ends.append(time.monotonic())
                return
            text += data
            while b"\n" in text:
                line, text = text.split(b"\n", 1)
                line = line.decode()
                if line == "":
                    if pending_id is not None:
                        self.last_id = pending_id
                    if has_data and pending_id is not None:
                        self.ids.append(int(pending_id))
                    pending_id, has_data = None, False
                elif line.startswith("retry:"):
                    self.retry = int(line[6:].strip()) / 1000
                elif line.startswith("id:"):
                    pending_id = line[3:].strip()
                elif line.startswith("data:"):
                    has_data = True
        answer.ended = "client"
        self._drop()

    def _chunk(self) -> bytes | None:
        """The next chunk's data; None once the response ended (last chunk, or the connection closed)."""
        answer = self.answers[-1]
        deadline = self.deadline
        size_line = self.conn.line(deadline)
        if size_line is None:
            answer.ended = "eof"
            self._after(answer, completed=False)
            return None
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise Framing(f"not a chunk-size line: {size_line[:80]!r}") from None
        if size == 0:
            if self.conn.line(deadline) != b"":  # no trailers: the last chunk ends with an empty line
                raise Framing("the last chunk is not followed by CRLF")
            answer.ended = "last-chunk"
            self._after(answer, completed=True)
            return None
        data = self.conn.exactly(size + 2, deadline)
        if data is None:
            answer.ended = "eof"
            self._after(answer, completed=False)
            return None
        if data[-2:] != b"\r\n":
            raise Framing(f"chunk data not followed by CRLF: {data[-20:]!r}")
        return data[:-2]

    def _after(self, answer: Answer, completed: bool) -> None:
        """Keep the connection for the next request when the response allows it, as browsers do."""
        answer.server_closed = self._closes_soon()
        if not completed or answer.server_closed or answer.headers.get("connection", "").lower() == "close":
            self._drop()

    def _closes_soon(self) -> bool:
        """Whether the server closes the connection within a moment of the response's end."""
        try:
            wait_until(lambda: self.conn.peer_closed(), 0.5, interval=0.01, what="close")
            return True
        except TimeoutError:
            return False


def read_head(conn: Conn, deadline: float) -> tuple[int, dict[str, str]] | None:
    """The status and headers (names lowercased) of the next response on `conn` (None on EOF)."""
    status_line = conn.line(deadline)
    if status_line is None:
        return None
    headers = {}
    while line := conn.line(deadline):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if line is None:
        return None
    return int(status_line.split()[1]), headers


def read_response(conn: Conn, deadline: float) -> tuple[int, dict[str, str], bytes] | None:
    """One Content-Length response from `conn` (None when the connection ends first)."""
    head = read_head(conn, deadline)
    if head is None:
        return None
    body = conn.exactly(int(head[1].get("content-length", "0")), deadline) or b""
    return head[0], head[1], body


def open_probe(server: Gunicorn, cid: str, key: str) -> tuple[Conn, dict[str, str], int | None]:
    """A raw stream, its response head read: (connection, headers, pid of the worker serving it)."""
    conn = Conn(socket.create_connection(("127.0.0.1", server.port), timeout=5))
    conn.sock.sendall(f"GET {SSE.format(cid)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                      f"Last-Event-ID: 1000000\r\n\r\n".encode())
    try:
        answer = read_head(conn, time.monotonic() + 10)
        assert answer is not None and answer[0] == 200, f"the probe stream opens: {answer}"
        return conn, answer[1], serving_pid(server, conn.sock.getsockname()[1])
    except BaseException:
        conn.close()
        raise


def probe_after_stream_end(conn: Conn, exiting: set[int]) -> str | None:
    """Read the probe's stream to its end, then send it a second request: what answered it (None: nothing).

    The stream may end with the last chunk or with the connection closing; either way a second
    request on that socket must get no answer from the worker (it is exiting).
    """
    deadline = time.monotonic() + 8
    while True:
        size_line = conn.line(deadline)
        if size_line is None:
            return None  # closed by the server: the cleanest answer
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert conn.line(deadline) == b"", "the last chunk ends with CRLF"
            break
        data = conn.exactly(size + 2, deadline)
        if data is None:
            return None
        assert data.endswith(b"\r\n"), "chunk data ends with CRLF"
    try:
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_response(conn, time.monotonic() + 5)
    except OSError:
        return None
    if answer is None:
        return None
    status, _headers, body = answer
    pid = json.loads(body).get("worker_pid") if status == 200 else None
    who = "an EXITING worker" if pid in exiting or status == 503 else "a worker"
    return f"{who} (pid {pid}) answered {status} {body[:120]!r} on the stream's connection"


def post_steadily(api: Api, cid: str, count: int, pause: float, posted: list[int]) -> None:
    """Post `count` events, `pause` s apart; a post that meets the moment no worker answers is retried."""
    for _ in range(count):
        for _attempt in range(50):
            try:
                posted.append(api.post(cid, type="user_message", content="x"))
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(pause)


def follow_through_restart(start_server, make_key, workers: int, restart) -> None:
    """An EventSource-like client follows while events are posted; `restart` hits its worker mid-way."""
    server = start_server(workers=workers, SSE_RETRY_MS=RETRY_MS, SSE_MAX_STREAMS_PER_USER="0")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    total = 40
    client = EventSourceLike(server, cid, api.key, total)
    posted: list[int] = []
    poster = threading.Thread(target=post_steadily, args=(api, cid, total, 0.05, posted), daemon=True)
    probe: Conn | None = None
    probes: list[Conn] = []
    try:
        client.start()
        wait_until(lambda: client.answers or client.error, 10, what="the stream to open")
        poster.start()
        wait_until(lambda: len(client.ids) >= 5 or client.failure or client.error, 10, what="first events")
        assert client.failure is None and client.error is None, (client.failure, client.error)
        stream_pid = wait_until(lambda: serving_pid(server, client.local_port()), 5, what="the stream's worker")
        # A second stream on the same worker, to ask its connection for more after the stream ends.
        for _ in range(30):
            conn, probe_headers, pid = open_probe(server, cid, api.key)
            probes.append(conn)
            if pid == stream_pid:
                probe = conn
                break
        for other in probes:
            if other is not probe:
                other.close()
        assert probe is not None, "a probe stream on the stream's worker"

        exiting = restart(server, stream_pid)
        signalled = time.monotonic()
        reuse = probe_after_stream_end(probe, exiting)

        poster.join(20)
        wait_until(lambda: len(client.ids) >= total or client.failure or client.error, 20,
                   what=f"all {total} events (got {len(client.ids)})")
    finally:
        client.stop.set()
        for thread, bound in ((client, 10), (poster, 20)):
            if thread.ident is not None:
                thread.join(bound)
        for conn in probes:
            conn.close()
    assert not client.is_alive() and not poster.is_alive()
    assert client.error is None, repr(client.error)
    assert client.failure is None, (
        f"the EventSource got {client.failure.status} {client.failure.body!r} "
        f"(served by pid {client.failure.served_by}, on a {'reused' if client.failure.reused else 'new'} "
        f"connection) and would close for good"
    )
    assert reuse is None, f"a second request on a stream's socket must get no answer; but {reuse}"
    assert probe_headers.get("connection", "").lower() == "close", probe_headers
    assert probe_headers.get("transfer-encoding", "").lower() == "chunked", probe_headers
    assert posted == list(range(total))
    assert client.ids == list(range(total)), "every posted event exactly once, in order"
    assert any(t >= signalled for t in client.stream_ends), "the stream ended after the signal"
    streams = [a for a in client.answers if a.status == 200]
    assert len(streams) >= 2, "the client reconnected"
    for a in streams:
        assert a.headers.get("connection", "").lower() == "close", a.headers
        assert not a.reused, "a stream request never goes on a connection another stream used"
        assert a.ended == "client" or a.server_closed, f"the server closes a stream's connection at its end: {a}"
    later = [a for a in streams if a is not streams[0]]
    assert all(a.served_by is not None and a.served_by not in exiting for a in later), (
        [a.served_by for a in later], exiting)
    assert "Traceback" not in server.log()


def test_hup_reload_does_not_end_an_eventsource_for_good(start_server, make_key):
    def hup(server: Gunicorn, _stream_pid: int) -> set[int]:
        old = set(server.worker_pids())
        server.signal(signal.SIGHUP)
        return old

    follow_through_restart(start_server, make_key, 1, hup)


def test_worker_term_does_not_end_an_eventsource_for_good(start_server, make_key):
    def term(_server: Gunicorn, stream_pid: int) -> set[int]:
        os.kill(stream_pid, signal.SIGTERM)
        return {stream_pid}

    follow_through_restart(start_server, make_key, 2, term)


def test_stream_requests_close_and_other_requests_keep_alive(start_server, make_key):
    """HEAD and HTTP/1.0 streams still work (and close); a REST request keeps its connection."""
    server = start_server()
    api = Api(server.base, make_key("alice"))
    cid = api.create(initial_user_msg="zero")
    deadline = time.monotonic() + 10
    conns: list[Conn] = []
    try:
        # Two REST requests on one connection: keep-alive as before.
        rest = Conn(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        conns.append(rest)
        for _ in range(2):
            rest.sock.sendall(f"GET /api/conversations/{cid} HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {api.key}\r\n\r\n".encode())
            status, headers, _body = read_response(rest, deadline)
            assert status == 200 and headers.get("connection", "").lower() == "keep-alive", headers

        # HEAD of a stream: its headers, no body, and the connection ends there.
        head = Conn(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        conns.append(head)
        head.sock.sendall(f"HEAD {SSE.format(cid)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key}\r\n\r\n"
                          .encode())
        status_line = head.line(deadline)
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        head_lines = []
        while line := head.line(deadline):
            head_lines.append(line.lower())
        assert b"content-type: text/event-stream; charset=utf-8" in head_lines, head_lines
        assert b"connection: close" in head_lines and not any(b"transfer-encoding" in h for h in head_lines)
        assert not head.fill(time.monotonic() + 1) and head.buf == b"", "no body, then the server closes"

        # An HTTP/1.0 stream: no chunks, the events as they are; it ends with the connection.
        old = Conn(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        conns.append(old)
        old.sock.sendall(f"GET {SSE.format(cid)} HTTP/1.0\r\nAuthorization: Bearer {api.key}\r\n\r\n".encode())
        while b"id: 0\n" not in old.buf:
            assert old.fill(deadline)
        head_bytes = old.buf.split(b"\r\n\r\n", 1)[0].lower()
        assert head_bytes.startswith(b"http/1.0 200") and b"transfer-encoding" not in head_bytes, head_bytes
        assert b"connection: close" in head_bytes, head_bytes
        status, _, _ = api.call("DELETE", f"/api/conversations/{cid}")
        assert status == 200
        while old.fill(deadline):  # the deletion ends the stream within 2 s: EOF
            pass
        assert old.buf.endswith(b"\n"), "whole lines up to the end"
    finally:
        for conn in conns:
            conn.close()


def test_a_stream_path_written_with_escapes_still_closes_its_connection(start_server, make_key):
    """Flask routes `/api/%73se/...` as a stream: the connection must close after it all the same."""
    server = start_server(SSE_HEARTBEAT_SECONDS="60")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /api/%73se/conversations/{cid}/events HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {api.key}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 200") and b"connection: close" in lines, lines
