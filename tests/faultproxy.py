"""A TCP proxy in front of Redis that understands RESP and can lose or delay the reply to a command.

One thread runs every connection (selectors, non-blocking sockets). The proxy parses what a
client sends into commands (arrays of bulk strings, several per packet when pipelined) and what
Redis sends back into replies, so it knows which reply answers which command. A fault is armed
with a predicate on a command's argv (a list of bytes):

- ``cut_reply_after(pred)``: the matching command goes through to Redis, which runs it; its
  reply is dropped and both sides of that client's connection are closed. Commands the client
  sent after it on that connection (the rest of a pipeline) are not forwarded.
- ``delay_reply(pred, seconds)``: the reply to the matching command (and every later reply on
  that connection, to keep their order) is held back for ``seconds``, as a slow Redis would.

Other connections are never touched. ``stop()`` closes every socket and joins the thread.
"""
from __future__ import annotations

import collections
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Argv = list[bytes]
Predicate = Callable[[Argv], bool]

_CRLF = b"\r\n"
_BULK_TYPES = frozenset(b"$!=")  # bulk string, blob error, verbatim string: a length, then bytes
_ARRAY_TYPES = frozenset(b"*~>")  # array, set, push: a count of elements
_MAP_TYPES = frozenset(b"%|")  # map, attribute: a count of key/value pairs
_ATTRIBUTE = ord("|")
_RECV = 1 << 16


def resp_end(buf: bytes | bytearray, pos: int = 0) -> int:
    """The offset just past the RESP2/RESP3 value that starts at `pos`; -1 while it is incomplete."""
    pending = 1
    size = len(buf)
    while pending:
        if pos >= size:
            return -1
        eol = buf.find(_CRLF, pos)
        if eol < 0:
            return -1
        kind = buf[pos]
        pending -= 1
        if kind in _BULK_TYPES:
            length = int(buf[pos + 1:eol])
            pos = eol + 2 if length < 0 else eol + 2 + length + 2
        elif kind in _ARRAY_TYPES:
            pending += max(int(buf[pos + 1:eol]), 0)
            pos = eol + 2
        elif kind in _MAP_TYPES:
            # An attribute is followed by the value it annotates.
            pending += 2 * max(int(buf[pos + 1:eol]), 0) + (1 if kind == _ATTRIBUTE else 0)
            pos = eol + 2
        else:  # + - : _ , # ( and anything line-shaped
            pos = eol + 2
    return pos if pos <= size else -1


def parse_command(buf: bytes | bytearray, pos: int = 0) -> tuple[Argv | None, int]:
    """(argv, end) of the client command at `pos` (RESP array or inline); (None, -1) if incomplete."""
    if buf[pos] != ord("*"):  # an inline command: one line of words
        eol = buf.find(_CRLF, pos)
        if eol < 0:
            return None, -1
        return bytes(buf[pos:eol]).split(), eol + 2
    eol = buf.find(_CRLF, pos)
    if eol < 0:
        return None, -1
    count = int(buf[pos + 1:eol])
    pos = eol + 2
    argv: Argv = []
    for _ in range(max(count, 0)):
        eol = buf.find(_CRLF, pos)
        if eol < 0:
            return None, -1
        length = int(buf[pos + 1:eol])
        start, pos = eol + 2, eol + 2 + length + 2
        if pos > len(buf):
            return None, -1
        argv.append(bytes(buf[start:start + length]))
    return argv, pos


@dataclass
class Fault:
    """One armed fault: which commands it takes, what it does to their replies, how often."""

    predicate: Predicate
    action: str  # "cut" or "delay"
    seconds: float = 0.0
    remaining: int | None = 1  # None: every matching command until disarmed
    hits: int = 0  # matching commands it took
    applied: int = 0  # replies it dropped or held back
    matched: list[Argv] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float) -> bool:
        """Wait until the fault has acted on a reply at least once; whether it did."""
        return self.done.wait(timeout)


class _Pair:
    """One client connection and its own connection to Redis."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.from_client = bytearray()
        self.to_upstream = bytearray()
        self.from_upstream = bytearray()
        self.to_client: collections.deque[tuple[float, bytearray]] = collections.deque()
        self.sent = 0  # commands forwarded
        self.replied = 0  # replies read from Redis
        self.faults: dict[int, Fault] = {}  # command number -> the fault for its reply
        self.doomed = False  # a cut is pending: forward no more commands
        self.release_at = 0.0  # replies are held until then (delay faults), never reordered
        self.closed = False


class FaultProxy:
    """A loopback TCP proxy to Redis that can cut or delay the reply to chosen commands."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 6379, log_size: int = 10_000):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._pairs: set[_Pair] = set()
        self._log: collections.deque[Argv] = collections.deque(maxlen=log_size)
        self._stopping = False
        self.errors: list[Exception] = []  # what went wrong inside the proxy (tests assert it is empty)
        self._thread: threading.Thread | None = None

    # Control (any thread) -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<port>/0: give this to the client under test."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> FaultProxy:
        """Start serving; returns the proxy."""
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener; join the thread."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")
            self._thread = None
        else:
            self._close_all()

    def __enter__(self) -> FaultProxy:
        """Start it."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop it."""
        self.stop()

    def cut_reply_after(self, predicate: Predicate, count: int | None = 1) -> Fault:
        """Let the next `count` matching commands run, drop their replies and cut their connections."""
        return self._arm(Fault(predicate, "cut", remaining=count))

    def delay_reply(self, predicate: Predicate, seconds: float, count: int | None = 1) -> Fault:
        """Hold back the reply to the next `count` matching commands for `seconds`."""
        return self._arm(Fault(predicate, "delay", seconds=seconds, remaining=count))

    def disarm(self) -> None:
        """Forget every armed fault (replies already held back are still delivered late)."""
        with self._lock:
            self._faults.clear()

    def commands(self, predicate: Predicate | None = None) -> list[Argv]:
        """The commands seen so far (the last `log_size`), optionally only those matching."""
        with self._lock:
            seen = list(self._log)
        return [argv for argv in seen if predicate is None or predicate(argv)]

    def clear_log(self) -> None:
        """Forget the commands seen so far."""
        with self._lock:
            self._log.clear()

    @property
    def connection_count(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._pairs)

    def _arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # The loop (proxy thread only) -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._sel.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        pair, side = key.data
                        if not pair.closed:
                            self._service(pair, side, mask)
                now = time.monotonic()
                for pair in list(self._pairs):
                    if pair.to_client and not pair.closed and pair.to_client[0][0] <= now:
                        self._flush_client(pair)
        finally:
            self._close_all()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        due = [p.to_client[0][0] for p in self._pairs if p.to_client and p.to_client[0][0] > now]
        return max(min(due) - now, 0.0) if due else None

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        try:
            client, _addr = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()  # Redis is down: so is the proxy, for this client
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        with self._lock:
            self._pairs.add(pair)
        self._sel.register(client, selectors.EVENT_READ, (pair, "client"))
        self._sel.register(upstream, selectors.EVENT_READ, (pair, "upstream"))

    def _service(self, pair: _Pair, side: str, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                if side == "client":
                    self._flush_client(pair)
                else:
                    self._flush_upstream(pair)
            if mask & selectors.EVENT_READ and not pair.closed:
                sock = pair.client if side == "client" else pair.upstream
                data = sock.recv(_RECV)
                if not data:
                    self._close(pair)
                elif side == "client":
                    self._from_client(pair, data)
                else:
                    self._from_upstream(pair, data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(pair)
        except Exception as err:  # a malformed stream, or a predicate that raised: only this pair ends
            self.errors.append(err)
            self._close(pair)

    def _from_client(self, pair: _Pair, data: bytes) -> None:
        buf = pair.from_client
        buf += data
        pos = 0
        while pos < len(buf):
            argv, end = parse_command(buf, pos)
            if argv is None:
                break
            raw, pos = buf[pos:end], end
            fault = self._match(argv)
            if pair.doomed:
                continue  # the connection is about to be cut: Redis never sees the rest
            pair.to_upstream += raw
            if fault is not None:
                pair.faults[pair.sent] = fault
                pair.doomed = fault.action == "cut"
            pair.sent += 1
        del buf[:pos]
        self._flush_upstream(pair)

    def _match(self, argv: Argv) -> Fault | None:
        with self._lock:
            self._log.append(argv)
            for fault in self._faults:
                if fault.remaining == 0 or not fault.predicate(argv):
                    continue
                fault.hits += 1
                fault.matched.append(argv)
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def _from_upstream(self, pair: _Pair, data: bytes) -> None:
        buf = pair.from_upstream
        buf += data
        pos = 0
        now = time.monotonic()
        while pos < len(buf):
            end = resp_end(buf, pos)
            if end < 0:
                break
            fault = pair.faults.pop(pair.replied, None)
            pair.replied += 1
            if fault is not None and fault.action == "cut":
                self._applied(fault)  # before the client can see the cut
                self._flush_client(pair)  # the replies before it still go out, if they can
                self._close(pair)
                return
            if fault is not None:
                pair.release_at = max(pair.release_at, now + fault.seconds)
                self._applied(fault)
            if pair.to_client and pair.to_client[-1][0] == pair.release_at:
                pair.to_client[-1][1].extend(buf[pos:end])
            else:
                pair.to_client.append((pair.release_at, bytearray(buf[pos:end])))
            pos = end
        del buf[:pos]
        self._flush_client(pair)

    def _applied(self, fault: Fault) -> None:
        with self._lock:
            fault.applied += 1
        fault.done.set()

    def _flush_upstream(self, pair: _Pair) -> None:
        if pair.to_upstream:
            sent = self._send(pair, pair.upstream, pair.to_upstream)
            del pair.to_upstream[:sent]
        self._interest(pair, pair.upstream, bool(pair.to_upstream))

    def _flush_client(self, pair: _Pair) -> None:
        now = time.monotonic()
        while pair.to_client and pair.to_client[0][0] <= now and not pair.closed:
            chunk = pair.to_client[0][1]
            sent = self._send(pair, pair.client, chunk)
            del chunk[:sent]
            if chunk:
                break
            pair.to_client.popleft()
        if not pair.closed:
            blocked = bool(pair.to_client) and pair.to_client[0][0] <= now
            self._interest(pair, pair.client, blocked)

    def _send(self, pair: _Pair, sock: socket.socket, data: bytearray) -> int:
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._close(pair)
            return 0

    def _interest(self, pair: _Pair, sock: socket.socket, writing: bool) -> None:
        if pair.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        if self._sel.get_key(sock).events != events:
            self._sel.modify(sock, events, self._sel.get_key(sock).data)

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.client, pair.upstream):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            self._pairs.discard(pair)

    def _close_all(self) -> None:
        for pair in list(self._pairs):
            self._close(pair)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._sel.close()


def command_name(argv: Argv) -> bytes:
    """The command's name, upper case (b'' for an empty command)."""
    return argv[0].upper() if argv else b""


def script_keys(argv: Argv) -> list[bytes]:
    """The KEYS of an EVAL/EVALSHA/FCALL (and their _RO forms); [] for any other command."""
    if command_name(argv) in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"):
        try:
            return argv[3:3 + int(argv[2])]
        except (IndexError, ValueError):
            return []
    return []


def describe(argv: Argv, width: int = 120) -> str:
    """A short, printable form of a command for assertion messages."""
    text = " ".join(a.decode(errors="replace") for a in argv)
    return text if len(text) <= width else text[:width] + "..."



class DownRedis:
    """A listener on Redis's port while Redis is down: each connection is noted (when, whose) and closed.

    A client of ours names itself in its handshake (`CLIENT SETNAME oh-sse:<pid>:<role>`, after
    HELLO, answered, and other CLIENT subcommands, refused as an old Redis would): the role it
    names (or "?" if it sent another command, or nothing within a second) is recorded with the
    time the connection arrived, and the connection is closed without a reply to the SETNAME.
    """

    def __init__(self, port: int):
        self.port = port
        self.attempts: list[tuple[float, str]] = []  # (monotonic time, role)
        self._server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._server.settimeout(0.2)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DownRedis:
        """Start accepting."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket."""
        self._stopped.set()
        self._thread.join(5)
        self._server.close()

    def times(self, role: str) -> list[float]:
        """When connections of `role` arrived."""
        return [t for t, r in list(self.attempts) if r == role]

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            with conn:
                self.attempts.append((arrived, self._role(conn)))

    @staticmethod
    def _role(conn: socket.socket) -> str:
        conn.settimeout(1.0)
        buf = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    return "?"
                buf += data
                argv, end = parse_command(buf)
                if argv is None:
                    continue
                buf = buf[end:]
                if argv and argv[0].upper() == b"HELLO":
                    # RESP3's handshake (redis-py's default): answered, so the client names itself next.
                    proto = argv[1] if len(argv) > 1 else b"2"
                    conn.sendall(b"%1\r\n$5\r\nproto\r\n:" + proto + b"\r\n")
                    continue
                if len(argv) >= 3 and argv[1].upper() == b"SETNAME":
                    return argv[2].decode(errors="replace").rsplit(":", 1)[-1]
                if len(argv) < 2 or argv[0].upper() != b"CLIENT":
                    return "?"  # a command: this client did not name itself first
                conn.sendall(b"-ERR unknown subcommand\r\n")  # redis-py 8's CLIENT MAINT_NOTIFICATIONS: optional
        except OSError:
            return "?"
