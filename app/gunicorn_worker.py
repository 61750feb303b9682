"""gunicorn's gevent worker with a bounded request body: a slow client cannot keep a connection slot.

What bounds a request's arrival under gunicorn 27's gevent worker (workers/ggevent.py,
base_async.py, http/parser.py, read before choosing this):

- The head: every request on a connection, the first one too, is parsed inside
  `with self.timeout_ctx(): req = next(parser)` (base_async.py `handle`, the keep-alive loop
  that gunicorn.conf.py's `keepalive = 5` selects), and the gevent worker's `timeout_ctx` is
  `gevent.Timeout(cfg.keepalive, False)`: a total, silent bound. A head still incomplete 5 s
  after the connection was accepted (or after the previous response) closes the connection
  without an answer, and the same timer bounds gunicorn's drain of a body the app left unread.
  Sizes are bounded by `limit_request_line`, `limit_request_fields` and
  `limit_request_field_size` (gunicorn answers 400/414/431 itself). Nothing to add there.
- The body: nothing. The app reads it after `next(parser)` has returned, from a blocking socket
  with no timeout; `timeout` (30) is only the worker's heartbeat to the master, which a gevent
  worker keeps beating whatever its connections do. A client that sends `Content-Length: 1000`
  then a byte a second, or nothing, holds its slot of `worker_connections` forever.

So this worker hands the app, as `wsgi.input`, a body that must arrive within
REQUEST_BODY_TIMEOUT_SECONDS of the head (app/request_bounds.py; a total, so a trickle is ended
too). Why a worker subclass and not WSGI middleware: the bound needs gunicorn's request object, to
mark the connection must-close (`req.force_close()`, the switch gunicorn.conf.py's `pre_request`
uses too) and its body as failed, and it applies to every WSGI app served this way (the tests'
too). The body bound applies to reads only: an event stream, a long response to a GET with no
body, is never cut by it.

- The response: nothing either. gunicorn writes it with a blocking `sendall` and no timeout
  (http/wsgi.py `Response.write`, util.write), so a client that never reads holds its slot, and
  the response in memory, forever. Each request here runs under a `WriteStallGuard`
  (app/request_bounds.py): a client that acknowledges none of the bytes waiting for it for
  RESPONSE_WRITE_TIMEOUT_SECONDS gets a reset, the write fails with EPIPE (gunicorn logs that at
  debug), and one WARNING line says whose response was cut. A slow reader that takes any byte
  meanwhile is never cut. Event streams are not guarded (`EventStreamsUnguarded`): the hub ends
  a stalled stream itself (SSE_STALL_SECONDS).

This module is imported by the master (gunicorn loads the worker class before forking), so it
imports only what gunicorn's own gevent worker does; the app's modules come after the worker has
patched the standard library.
"""
from __future__ import annotations

import copy
import json
import re
import time
from typing import Any

from gevent.local import local
from gunicorn.http.body import LengthReader
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    ExpectationFailed,
    InvalidChunkSize,
    InvalidH2CPreface,
    InvalidHeader,
    InvalidHeaderName,
    InvalidHTTPVersion,
    InvalidProxyLine,
    InvalidRequestLine,
    InvalidRequestMethod,
    ObsoleteFolding,
    UnsupportedTransferCoding,
)
from gunicorn.workers.ggevent import GeventWorker

# gunicorn's parse errors that carry request bytes (http/errors.py, each one's __str__ shows this
# attribute), which handle_error logs at WARNING and echoes in its HTML 400: a header line with no
# colon is logged whole, `Authorization Bearer <key>` too. Exact types: InvalidResponseHeader (an
# InvalidHeader) is the app's own header, named by gunicorn without its value.
REQUEST_BYTES_ATTRIBUTE = {
    InvalidRequestMethod: "method",
    InvalidHTTPVersion: "version",
    InvalidHeader: "hdr",
    InvalidHeaderName: "hdr",
    ObsoleteFolding: "hdr",
    ExpectationFailed: "expect",
    UnsupportedTransferCoding: "hdr",
    InvalidProxyLine: "line",
    InvalidChunkSize: "data",
    ChunkMissingTerminator: "term",
    InvalidH2CPreface: "data",
}
# gunicorn's own texts in an InvalidHeader (http/message.py), no request bytes: shown as they are.
GUNICORN_HEADER_TEXTS = {"CONTENT-LENGTH", "TRANSFER-ENCODING", "bare LF as line terminator"}


METHOD = re.compile(r"[A-Z]{1,20}")
PRINTABLE_HEAD = re.compile(r"[!-~]*")  # printable ASCII, no space


def redacted_request_line(text: str) -> str:
    """A request line (or target) gunicorn refused, as its method and path; the rest shown as `...`.

    The path only up to its query string, or to the first byte that is not printable ASCII: a
    query string split off by a tab or a no-break space (latin-1 0xA0) is still a query string.
    A line that does not start with a method is shown by its length alone: a client may send
    anything as its request line, a key too.
    """
    if text == "bare LF as line terminator":  # gunicorn's own text
        return text
    method, space, target = text.partition(" ")
    if not space and text.startswith("/"):
        method, target = "", text
    elif not METHOD.fullmatch(method):
        return f"<{len(text)} characters, not shown>"
    shown = " ".join(part for part in (method, PRINTABLE_HEAD.match(target).group().split("?", 1)[0]) if part)
    return shown if len(shown) == len(text) else shown + " ..."


def redacted(exc: BaseException) -> BaseException:
    """The parse error with no request bytes in its text but a method and path: no query string, no header."""
    if isinstance(exc, InvalidRequestLine) and isinstance(exc.req, str):
        return InvalidRequestLine(redacted_request_line(exc.req))  # ASCII: it is also the answer
    attribute = REQUEST_BYTES_ATTRIBUTE.get(type(exc))
    shown = getattr(exc, attribute, None) if attribute else None
    if attribute is None or shown in GUNICORN_HEADER_TEXTS:
        return exc
    clean = copy.copy(exc)
    setattr(clean, attribute, f"<{len(shown) if isinstance(shown, (str, bytes)) else '?'} characters, not shown>")
    return clean


# The machine codes of gunicorn's own refusals (workers/base.py handle_error picks the status).
REFUSAL_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                 431: "headers_too_large", 501: "not_implemented"}


class JsonRefusals:
    """The client socket as gunicorn's handle_error sees it: its HTML error page goes out as API.md's JSON error.

    gunicorn writes the whole answer with one `sendall` (util.write_error): its status line is kept,
    the rest is replaced. The message is the parse error's own text, once `redacted`: what is
    wrong, never the request's bytes.
    """

    def __init__(self, sock: Any, message: str):
        self._sock = sock
        self._message = message

    def sendall(self, data: bytes) -> None:
        """Send the JSON answer with gunicorn's status line."""
        status_line = data.split(b"\r\n", 1)[0]
        status = int(status_line.split(b" ", 2)[1])
        code = REFUSAL_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
        message = "internal error" if status == 500 else self._message
        body = json.dumps({"status": "error", "error": code, "message": message}).encode() + b"\n"
        head = (status_line + b"\r\nConnection: close\r\nContent-Type: application/json\r\n"
                b"X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n\r\n" % len(body))
        self._sock.sendall(head + body)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # gettimeout, setblocking: util.write_nonblock's


def event_stream(headers: list[tuple[str, str]]) -> bool:
    """Whether a response with these headers is an event stream (text/event-stream)."""
    return any(name.lower() == "content-type" and value.lower().startswith("text/event-stream")
               for name, value in headers)


class EventStreamsUnguarded:
    """The WSGI app, as gunicorn calls it, with the write guard of the request stopped for an event stream."""

    def __init__(self, app: Any, current: local):
        self.app = app
        self._current = current

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        guard = getattr(self._current, "write_guard", None)
        if guard is None:
            return self.app(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if event_stream(headers):
                guard.stop()  # app/hub.py ends a stalled stream itself (SSE_STALL_SECONDS)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # gunicorn.conf.py reads the Flask app's `extensions` through it


class BoundedGeventWorker(GeventWorker):
    """The gevent worker; a request's body must arrive within REQUEST_BODY_TIMEOUT_SECONDS of its head."""

    body_timeout = 30.0
    write_timeout = 0.0  # RESPONSE_WRITE_TIMEOUT_SECONDS, set by load_wsgi

    def load_wsgi(self) -> None:
        """Load the app, then the bounds (here: after gevent's patching, which the app's imports need first)."""
        super().load_wsgi()
        from .config import load_settings

        settings = load_settings()
        self.body_timeout = settings["REQUEST_BODY_TIMEOUT_SECONDS"]
        self.write_timeout = settings["RESPONSE_WRITE_TIMEOUT_SECONDS"]
        self._current = local()  # the request this greenlet serves: its write guard
        if self.write_timeout:
            self.wsgi = EventStreamsUnguarded(self.wsgi, self._current)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        """Serve one request, its response's writes guarded against a client that takes nothing."""
        if not self.write_timeout:
            return self._handle_bounded_body(listener_name, req, sock, addr)
        from .request_bounds import MIN_PROGRESS, WriteStallGuard

        def cut(waiting: int) -> None:
            self.log.warning("Response to %s %s cut: the client took under %d bytes of it in %gs (%d bytes waiting)",
                             req.method, req.path, MIN_PROGRESS, self.write_timeout, waiting)

        self._current.write_guard = WriteStallGuard(sock, self.write_timeout, cut)
        try:
            return self._handle_bounded_body(listener_name, req, sock, addr)
        finally:
            self._current.write_guard.stop()
            self._current.write_guard = None

    def _handle_bounded_body(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        """Serve one request with its body bounded; gunicorn's own body back in place afterwards."""
        from .request_bounds import BoundedBody

        body = req.body
        reader = getattr(body, "reader", None)
        expected = reader.length if isinstance(reader, LengthReader) else None
        if body is None or expected == 0:  # no body: nothing to bound (an event stream is a GET without one)
            return super().handle_request(listener_name, req, sock, addr)
        req.body = BoundedBody(body, time.monotonic() + self.body_timeout, expected, req.force_close)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            # The parser drains what the app left unread from gunicorn's own body, under the keep-alive timer.
            req.body = body

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """The answer of gunicorn to a request it cannot parse, with no request bytes that may hold a secret.

        gunicorn logs the error at WARNING and answers its text: a request line it refuses (a raw
        non-ASCII byte in it, say) whole, query string included, and a header line it cannot split
        whole (`Authorization Bearer <key>`, colon forgotten). The access log leaves query strings
        out on purpose (gunicorn.conf.py), since a careless client may have put a key there; here
        the query string goes, and every header line, name or value (`redacted`). The answer is
        JSON, as every error of API.md is, not gunicorn's HTML page (`JsonRefusals`).
        """
        clean = redacted(exc)
        super().handle_error(req, JsonRefusals(client, str(clean)), addr, clean)
