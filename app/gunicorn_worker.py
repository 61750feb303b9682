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
too). Only reads are bounded, never the response: an event stream, a long response to a GET with
no body, is never cut by it.

This module is imported by the master (gunicorn loads the worker class before forking), so it
imports only what gunicorn's own gevent worker does; the app's modules come after the worker has
patched the standard library.
"""
from __future__ import annotations

import re
import time
from typing import Any

from gunicorn.http.body import LengthReader
from gunicorn.http.errors import InvalidRequestLine
from gunicorn.workers.ggevent import GeventWorker


class BoundedGeventWorker(GeventWorker):
    """The gevent worker; a request's body must arrive within REQUEST_BODY_TIMEOUT_SECONDS of its head."""

    body_timeout = 30.0

    def load_wsgi(self) -> None:
        """Load the app, then the bound (here: after gevent's patching, which the app's imports need first)."""
        super().load_wsgi()
        from .config import load_settings

        self.body_timeout = load_settings()["REQUEST_BODY_TIMEOUT_SECONDS"]

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
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
        """The answer of gunicorn to a request it cannot parse, with no query string in its log line.

        A request line gunicorn refuses (a raw non-ASCII byte in it, say) is logged whole at
        WARNING, query string included; the access log leaves query strings out on purpose
        (gunicorn.conf.py), since a careless client may have put a key there.
        """
        if isinstance(exc, InvalidRequestLine) and isinstance(exc.req, str):
            exc = InvalidRequestLine(re.sub(r"\?\S*", "?...", exc.req))  # ASCII: it is also the answer
        super().handle_error(req, client, addr, exc)
