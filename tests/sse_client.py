"""A small HTTP/1.1 + SSE reader over a raw socket: exactly what a browser's EventSource sees."""
from __future__ import annotations

import codecs
import json
import socket
import time
from dataclasses import dataclass, field


def recv_before(sock: socket.socket, deadline: float) -> bytes | None:
    """One recv, waiting until `deadline` at most: its bytes, b"" at EOF (or a reset), None if none came in time."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except OSError:
        return b""


@dataclass
class SSEEvent:
    """One dispatched event (or a comment, with `comment` set); `retry` if its block carried one."""

    id: str | None = None
    event: str = "message"
    data: str = ""
    retry: int | None = None
    comment: str | None = None

    def json(self):
        """The data as JSON."""
        return json.loads(self.data)


@dataclass
class SSEStream:
    """An open stream: status, headers, and a parser fed by the chunked body."""

    sock: socket.socket
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # for non-streaming (error) answers
    _raw: bytes = b""
    _text: str = ""
    _chunked: bool = False
    _eof: bool = False
    _pending: SSEEvent = field(default_factory=SSEEvent)
    _parsed: list[SSEEvent] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())
    retry: int | None = None
    # Blank lines that ended a block without data, id or event name (after a lone `retry:`, after a
    # comment, or one more blank line): nothing is dispatched here, but fetch-event-source and the
    # like hand each of them to the application as an empty message.
    empty_blocks: int = 0

    def close(self) -> None:
        """Drop the connection."""
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self, deadline: float) -> bool:
        data = recv_before(self.sock, deadline)
        if data is None:
            return False
        if not data:
            self._eof = True
            return False
        self._raw += data
        return True

    def _decode_chunks(self) -> None:
        while True:
            if not self._chunked:
                # Incremental: a read may end inside a multi-byte character.
                self._text += self._decoder.decode(self._raw)
                self._raw = b""
                return
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._raw[:line_end].split(b";")[0], 16)
            if size == 0:
                self._eof = True
                self._raw = b""
                return
            if len(self._raw) < line_end + 2 + size + 2:
                return
            self._text += self._decoder.decode(self._raw[line_end + 2:line_end + 2 + size])
            self._raw = self._raw[line_end + 2 + size + 2:]

    def _parse_events(self) -> list[SSEEvent]:
        out = []
        while "\n" in self._text:
            line, self._text = self._text.split("\n", 1)
            line = line.rstrip("\r")
            if line == "":
                ev = self._pending
                if ev.data or ev.event != "message" or ev.id is not None:
                    ev.data = ev.data[:-1] if ev.data.endswith("\n") else ev.data
                    out.append(ev)
                else:
                    self.empty_blocks += 1
                self._pending = SSEEvent()
                continue
            if line.startswith(":"):
                # A comment dispatches nothing and leaves the block it is in as it was.
                out.append(SSEEvent(comment=line[1:].strip()))
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._pending.data += value + "\n"
            elif name == "id":
                self._pending.id = value
            elif name == "event":
                self._pending.event = value
            elif name == "retry" and value.isdigit():
                self.retry = self._pending.retry = int(value)
        return out

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse more of an unchunked body: the events (and comments) its complete lines hold."""
        self._text += self._decoder.decode(data)
        return self._parse_events()

    def events(self, timeout: float = 10.0, comments: bool = False):
        """Yield events as they arrive until the stream ends or `timeout` passes without any."""
        deadline = time.monotonic() + timeout
        while True:
            self._decode_chunks()  # also what came in with the response head, before any read of ours
            self._parsed.extend(self._parse_events())
            while self._parsed:
                # Popped one at a time: a caller that stops early leaves the rest for the next call.
                ev = self._parsed.pop(0)
                if comments or ev.comment is None:
                    yield ev
                    deadline = time.monotonic() + timeout  # only what is yielded restarts the wait
            if self._eof:
                return
            while not self._recv(deadline):
                if self._eof or time.monotonic() >= deadline:
                    return

    def take(self, count: int, timeout: float = 10.0) -> list[SSEEvent]:
        """The next `count` conversation events (named ones included), or fewer if the stream stops."""
        got = []
        if count <= 0:
            return got
        for ev in self.events(timeout=timeout):
            got.append(ev)
            if len(got) >= count:
                break
        return got

    def ended(self, timeout: float) -> bool:
        """Whether the server ends the stream within `timeout` seconds (skipping what still arrives)."""
        deadline = time.monotonic() + timeout
        self._decode_chunks()  # the final chunk may be here already
        while not self._eof and time.monotonic() < deadline:
            if self._recv(deadline):
                self._decode_chunks()
                self._parse_events()
        return self._eof


OPENED: list[SSEStream] = []  # closed after each test by conftest, so no socket outlives its test


def start_stream(sock: socket.socket, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> SSEStream:
    """Send GET `path` (as a browser's EventSource does) on a connected socket and read the response head."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    stream = SSEStream(sock)
    OPENED.append(stream)
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in stream._raw:
        if not stream._recv(deadline):
            raise ConnectionError(f"no response head from {path}")
    head, stream._raw = stream._raw.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode().split("\r\n")
    stream.status = int(status_line.split()[1])
    for line in header_lines:
        name, _, value = line.partition(":")
        stream.headers[name.strip().lower()] = value.strip()
    stream._chunked = stream.headers.get("transfer-encoding", "").lower() == "chunked"
    return stream


def open_stream(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> SSEStream:
    """GET `path` and read the response head; the body is then read through the stream's methods."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    deadline = time.monotonic() + timeout  # for the head and an error answer's body together
    stream = start_stream(sock, port, path, headers, timeout)
    if stream.status != 200:
        length = int(stream.headers.get("content-length", "0"))
        while len(stream._raw) < length and stream._recv(deadline):
            pass
        stream.body = stream._raw[:length]
        stream.close()
    return stream
