"""A request body that must arrive whole, well framed and within a deadline (wrapped by app/gunicorn_worker.py).

gunicorn's gevent worker bounds the wait for a request's head (its keep-alive timer, see
gunicorn_worker.py) but not its body: the socket is blocking with no timeout, so a client that
sends `Content-Length: 1000` and then a byte a second, or nothing, holds one of the worker's
`worker_connections` slots for as long as it likes. Its body framing errors (a bad chunk size, a
missing chunk terminator) also reach the app as exceptions Flask answers 500, and a body cut short
by a client that went away reaches it as a shorter body it would act on.

This wrapper is what the app reads as `wsgi.input`. Each read may only use what is left of the
body's deadline (a total, not per read: a byte-a-second trickle is ended too), and every failure
is an `ApiError` (JSON, never a 500): a `408 request_timeout` past the deadline, a `400
invalid_body` for broken framing or a body that ended early. After any of them the connection
closes once the answer is sent: where the next request would start on it is unknown.

The worker also runs every response that is not an event stream under a `WriteStallGuard`: a
client that acknowledges none of what waits for it for RESPONSE_WRITE_TIMEOUT_SECONDS is reset.

Imported by the worker only after gevent has patched the standard library (this module imports
Flask and redis-py through app.errors).
"""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
from gunicorn.http.errors import ParseException

from .errors import ApiError, BadRequest
from .subscriber import bytes_acked  # the streams' stall check reads the same TCP_INFO field


class RequestBodyTimeout(ApiError):
    """The body did not arrive within REQUEST_BODY_TIMEOUT_SECONDS of the request's head."""

    status = 408
    code = "request_timeout"


class InvalidBody(BadRequest):
    """The body's framing is broken, or it ended before its Content-Length."""

    code = "invalid_body"


class BoundedBody:
    """A gunicorn request body (`Body`) read within a deadline, its framing errors made JSON errors."""

    def __init__(self, body: Any, deadline: float, expected: int | None, on_fail: Callable[[], None]):
        self._body = body
        self._deadline = deadline  # time.monotonic() by which the whole body must be in
        self._expected = expected  # Content-Length, None when chunked
        self._received = 0
        self._on_fail = on_fail
        self._failed: ApiError | None = None

    def read(self, size: int | None = None) -> bytes:
        """Up to `size` bytes (all that is left without one), as gunicorn's `Body.read`."""
        data = self._call(self._body.read, size)
        if self._expected is not None:
            left = self._expected - (self._received - len(data))
            wanted = left if size is None or size < 0 else min(size, left)
            if len(data) < wanted:  # gunicorn's LengthReader returns short at EOF, silently
                self._fail(InvalidBody(f"the request body ended after {self._received} of its "
                                       f"{self._expected} bytes (Content-Length)"))
        return data

    def readline(self, size: int | None = None) -> bytes:
        """One line, as gunicorn's `Body.readline`."""
        data = self._call(self._body.readline, size)
        if self._expected is not None and not data.endswith(b"\n"):
            left = self._expected - (self._received - len(data))
            wanted = left if size is None or size < 0 else min(size, left)
            if len(data) < wanted:
                self._fail(InvalidBody(f"the request body ended after {self._received} of its "
                                       f"{self._expected} bytes (Content-Length)"))
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        """Every line left."""
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _call(self, read: Callable[[int | None], bytes], size: int | None) -> bytes:
        if self._failed is not None:
            raise self._failed  # nothing more is read once the body is known to be bad
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self._fail(RequestBodyTimeout("the request body did not arrive in time"))
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            data = read(size)
        except gevent.Timeout as err:
            if err is not timer:
                raise
            self._fail(RequestBodyTimeout("the request body did not arrive in time"))
        except ParseException as err:  # InvalidChunkSize, ChunkMissingTerminator, a bad trailer...
            self._fail(InvalidBody(f"the request body is not valid chunked encoding ({type(err).__name__})"))
        except OSError:  # gunicorn's NoMoreData (EOF mid-chunk) is one, as is a reset
            self._fail(InvalidBody("the connection ended before the request body did"))
        finally:
            timer.close()
        self._received += len(data)
        return data

    def _fail(self, err: ApiError) -> None:
        self._failed = err
        self._body.failed = True  # gunicorn's own flag: never drain this body for a next request
        self._on_fail()
        raise err


def bytes_unacked(sock: Any) -> int:
    """Bytes written to `sock` that its peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


MIN_PROGRESS = 4096  # bytes a client must take per RESPONSE_WRITE_TIMEOUT_SECONDS while a response waits for it


class WriteStallGuard:
    """Cuts a connection whose client has taken under MIN_PROGRESS bytes of what waits for it in `seconds`.

    Why not a timeout on each write: what the kernel takes at once is up to its send buffer (MBs,
    autotuned), and a blocked write wakes only once a third of that has drained, so a per-write
    bound would cut a client that reads slowly but steadily. Progress is what the peer acks: a
    client that takes MIN_PROGRESS bytes in `seconds` is never cut, one whose window stays shut is.
    The check is a timer on gevent's loop (nothing runs in the request's greenlet); the cut is a
    reset (SO_LINGER 0, shutdown), so the write blocked on it fails with EPIPE, which gunicorn
    ends quietly (a debug line), and the kernel drops the queued bytes.
    """

    def __init__(self, sock: Any, seconds: float, on_cut: Callable[[int], None]):
        self._sock = sock
        self._seconds = seconds
        self._on_cut = on_cut
        self._acked = bytes_acked(sock)
        self._progress_at = time.monotonic()
        self._timer: Any = None
        if self._acked is not None:  # a unix socket (behind a local proxy) is the proxy's to bound
            interval = min(max(seconds / 4, 0.25), 5.0)
            self._timer = gevent.get_hub().loop.timer(interval, interval)
            self._timer.start(self._check)

    def stop(self) -> None:
        """No more checks (the response is done, or is an event stream, which bounds its own stalls)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _check(self) -> None:
        acked, now = bytes_acked(self._sock), time.monotonic()
        if acked is None:
            self.stop()  # closed meanwhile
            return
        waiting = bytes_unacked(self._sock)
        # Progress is MIN_PROGRESS bytes taken, not any: a client acking one segment now and then
        # (a slow-read attack) would otherwise hold its slot and the response for ever.
        if acked - self._acked >= MIN_PROGRESS or waiting == 0:
            self._acked, self._progress_at = acked, now
            return
        if now - self._progress_at < self._seconds:
            return
        self.stop()
        try:
            # Through a duplicate: gevent's own shutdown() would cancel the blocked write with EBADF
            # ("closed in another greenlet"), which gunicorn logs at ERROR with a traceback.
            with socket.fromfd(self._sock.fileno(), self._sock.family, socket.SOCK_STREAM) as same:
                same.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                same.shutdown(socket.SHUT_RDWR)
        except OSError:
            return  # gone already
        self._on_cut(waiting)
