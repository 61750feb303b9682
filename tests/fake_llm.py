"""A chat-completions server for the tests: OpenAI's streaming wire format on a free loopback port."""
from __future__ import annotations

import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def chunk_event(content: str | None = None, finish: str | None = None) -> bytes:
    """One `data:` event holding a chat.completion.chunk."""
    delta = {} if content is None else {"content": content}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class FakeLLM:
    """The server and what it is told to do; set the attributes before a request."""

    def __init__(self, key: str | None = "test-key"):
        self.key = key  # the Bearer token it wants; None: it wants none
        self.chunks: list[str] = ["Hel", "lo", " world"]  # the reply, one event per bit
        self.raw: list[bytes] | None = None  # sent instead, one write each (for odd or broken streams)
        self.delay = 0.01  # between writes
        self.status = 200  # another one: an error answer whose body echoes the Authorization header
        self.hang = False  # read the request, never answer
        self.hold_after: int | None = None  # after this many writes, keep the stream open until the client goes
        self.chunked = True  # Transfer-Encoding: chunked, else the end of the stream is the end of the connection
        self.json_reply: str | None = None  # answer with one JSON body, not a stream
        self.requests: list[dict[str, Any]] = []  # path, headers (lower-case names), body (parsed)
        self.received = threading.Event()
        self.disconnected = threading.Event()  # a client closed its connection before the reply's end
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base URL to give the agent (AGENT_LLM_BASE_URL)."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeLLM:
        """Listen on a free port and serve in a thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving; handlers that hold a stream open give up."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def events(self) -> list[bytes]:
        """What a 200 stream sends, write by write."""
        if self.raw is not None:
            return list(self.raw)
        return [chunk_event(c) for c in self.chunks] + [chunk_event(finish="stop"), b"data: [DONE]\n\n"]

    def wait_for_disconnect(self, sock: socket.socket) -> None:
        """Hold the connection until the client closes it (EOF or reset) or the server stops."""
        while not self._stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if not readable:
                continue
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    continue  # a next request: not a close; wait on
            except OSError:
                pass
            self.disconnected.set()
            return


class Handler(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions as FakeLLM says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""

    def do_POST(self) -> None:
        """Record the request, then answer it."""
        fake: FakeLLM = self.server.fake  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": parsed})
        fake.received.set()
        self.close_connection = True
        auth = self.headers.get("Authorization")
        if self.path != "/v1/chat/completions":
            return self.answer(404, {"error": {"message": f"no route {self.path}", "code": "not_found"}})
        if fake.key is not None and auth != f"Bearer {fake.key}":
            # like some real servers, echo what came: the agent must never pass this on
            return self.answer(401, {"error": {"message": f"Incorrect API key provided: {auth}",
                                               "code": "invalid_api_key"}})
        if fake.status != 200:
            return self.answer(fake.status, {"error": {"message": f"failed for {auth}", "type": "server_error"}})
        if fake.hang:
            return fake.wait_for_disconnect(self.connection)
        if fake.json_reply is not None:
            return self.answer(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                           "content": fake.json_reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding" if fake.chunked else "Connection", "chunked" if fake.chunked else "close")
        self.end_headers()
        try:
            for index, data in enumerate(fake.events()):
                if index == fake.hold_after:
                    return fake.wait_for_disconnect(self.connection)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if fake.chunked else data)
                if fake._stopping.wait(fake.delay):
                    return
            if fake.hold_after is not None and fake.hold_after >= len(fake.events()):
                return fake.wait_for_disconnect(self.connection)
            if fake.chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            fake.disconnected.set()

    def answer(self, status: int, payload: dict[str, Any]) -> None:
        """A whole JSON answer."""
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
