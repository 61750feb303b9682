"""Faults shaped like load (issue 11): clients that stop reading or read slowly, 2,000 connections dropped abruptly.

The worker is measured from outside: its RSS and open file descriptors (psutil), its greenlets
(the `openhands_greenlets` gauge of /metrics), its Redis connections (CLIENT LIST, by name).
"""
from __future__ import annotations

import json
import socket
import statistics
import struct
import threading
import time
import urllib.request

import psutil
import pytest

from app.keys import user_streams_key
from app.subscriber import Subscriber, bytes_acked, end_stalled

from .conftest import Api, bearer
from .fault_clients import SSE, Follower, Poster, open_streams, worker_pid
from .servers import wait_until
from .sse_client import open_stream
from .test_metrics import scrape, value
from .test_stream_faults import named_connections

MB = 1 << 20


def stalled_reader(port: int, path: str, key: str, last: int) -> socket.socket:
    """A client that asks for a stream (after event `last`) and never reads a byte of it (a 4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nLast-Event-ID: {last}\r\n\r\n"
                 .encode())
    return sock


def latencies(poster: Poster, follower: Follower) -> list[float]:
    """Seconds from each post's sending to its event reaching the follower."""
    return [follower.received[n] - sent for n, sent in poster.sent_at.items()]


def p(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`."""
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


class RssPeak(threading.Thread):
    """The highest RSS of a process, sampled every 50 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return


@pytest.mark.timeout(120)
def test_a_stalled_reader_is_ended_in_bounded_memory_and_other_readers_keep_their_latency(start_server, make_key):
    queue_max, size = 20, 100_000
    server = start_server(SSE_QUEUE_MAX=str(queue_max))
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    pid = worker_pid(server.base)
    alone, along = 60, 500  # events posted without, then with, the stalled client: 6 MB, then 50 MB
    fast = Follower(server.port, cid, api.key, alone + along, deadline=100, silence=15)
    fast.start()
    wait_until(lambda: open_streams(server.base) == 1, 10, what="the fast reader's stream")
    baseline = Poster(api, cid, alone, 0, size=size)
    baseline.run()  # in this thread: one post at a time, the reader keeping up
    assert baseline.error is None, repr(baseline.error)
    wait_until(lambda: len(fast.ids) == alone, 30, what="the baseline events read")
    rss_before = psutil.Process(pid).memory_info().rss

    stalled = stalled_reader(server.port, SSE.format(cid), api.key, alone - 1)
    wait_until(lambda: open_streams(server.base) == 2, 10, what="the stalled reader's stream")
    peak = RssPeak(pid)
    peak.start()
    loaded = Poster(api, cid, along, 0, size=size)
    loaded.run()
    assert loaded.error is None, repr(loaded.error)
    fast.join(60)
    assert fast.error is None and fast.ids == list(range(alone + along)), "the fast reader got everything, once"
    # The stalled stream is ended: it fell more than SSE_QUEUE_MAX events behind (the fast one has left).
    wait_until(lambda: open_streams(server.base) == 0, 20, what="the stalled stream ended")
    peak.stopped.set()
    peak.join(5)
    rss_after = psutil.Process(pid).memory_info().rss
    ends = scrape(server.base + "/metrics")
    assert value(ends, "openhands_stream_ends_total", reason="overflow") == 1
    assert value(ends, "openhands_subscriber_overflows_total") == 1

    # Memory: the stalled client held at most its queue (20 events of 100 kB, three copies each:
    # frame, batch, HTTP chunk), never the 50 MB pushed at it (150 MB in those copies); and what it
    # held was given back once it was ended.
    pushed = along * size
    growth_peak, growth_after = peak.peak - rss_before, rss_after - rss_before
    print(f"stalled reader: {pushed / MB:.0f} MB pushed; RSS {rss_before / MB:.0f} MB before, "
          f"peak +{growth_peak / MB:.1f} MB, after +{growth_after / MB:.1f} MB")
    assert growth_peak < 20 * MB, (growth_peak, pushed)
    assert growth_after < 10 * MB, (growth_after, pushed)

    # Latency: the other reader's events came as fast with the stalled client as without it.
    before, with_stalled = latencies(baseline, fast), latencies(loaded, fast)
    print(f"fast reader latency p50/p95: alone {p(before, .5) * 1000:.1f}/{p(before, .95) * 1000:.1f} ms, "
          f"with the stalled reader {p(with_stalled, .5) * 1000:.1f}/{p(with_stalled, .95) * 1000:.1f} ms")
    assert p(with_stalled, .5) <= max(0.25, 3 * p(before, .5))
    assert p(with_stalled, .95) <= max(1.0, 5 * p(before, .95))

    # The stalled client, reading at last: a prefix of the events, then the end of its stream.
    stalled.settimeout(10)
    raw = b""
    try:
        while data := stalled.recv(1 << 20):
            raw += data
    except (ConnectionResetError, TimeoutError):
        pass
    stalled.close()
    ids = [int(line[4:]) for line in raw.split(b"\n") if line.startswith(b"id: ")]
    assert ids == list(range(alone, alone + len(ids))) and len(ids) < along
    assert "Traceback" not in server.log()  # its end is no error of the server's


@pytest.mark.timeout(60)
def test_a_reader_stalled_in_its_catch_up_is_ended_quietly(start_server, make_key):
    # Its catch-up (6 MB, more than loopback's socket buffers take) goes out through gunicorn,
    # whose write blocks: cutting the stream off must not be an error in gunicorn's log.
    server = start_server(SSE_QUEUE_MAX="5")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    Poster(api, cid, 60, 0, size=100_000).run()
    stalled = stalled_reader(server.port, SSE.format(cid), api.key, -1)
    try:
        wait_until(lambda: open_streams(server.base) == 1, 10, what="the stalled reader's stream")
        Poster(api, cid, 10, 0).run()  # past SSE_QUEUE_MAX behind
        wait_until(lambda: open_streams(server.base) == 0, 20, what="the stalled stream ended")
        ends = scrape(server.base + "/metrics")
        assert value(ends, "openhands_stream_ends_total", reason="overflow") == 1
        assert "Traceback" not in server.log() and "Socket error" not in server.log()
    finally:
        stalled.close()


class SlowReader(threading.Thread):
    """A client that asks for a stream and reads it slowly: at most 32 KiB every 0.1 s, through a 32 KiB buffer."""

    def __init__(self, port: int, path: str, key: str, last: int):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          f"Last-Event-ID: {last}\r\n\r\n".encode())
        self.received = 0
        self.ended: BaseException | str | None = None  # why it stopped getting bytes (the server's end: "eof")
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(0.1):
                data = self.sock.recv(32768)
                if not data:
                    self.ended = "eof"
                    return
                self.received += len(data)
        except OSError as err:
            self.ended = err

    def close(self) -> None:
        """Stop reading and hang up."""
        self.stopped.set()
        self.join(15)
        self.sock.close()


def stream_ends(base: str, reason: str) -> float:
    """Streams ended so far for `reason`, over every worker (/metrics)."""
    return value(scrape(base + "/metrics"), "openhands_stream_ends_total", reason=reason)


@pytest.mark.timeout(90)
def test_a_stalled_stream_on_a_quiet_conversation_is_ended_and_a_slow_reader_is_not(start_server, make_key):
    # Nothing new is posted once the two streams are open: no overflow can end the stalled one.
    # 4 s: the check looks once a second, so a slow reader whose thread a loaded box starves for
    # a second must still show progress within half a stall.
    stall = 4.0
    server = start_server(SSE_QUEUE_MAX="5", SSE_STALL_SECONDS=str(stall))
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    Poster(api, cid, 60, 0, size=100_000).run()  # a 6 MB catch-up, more than the socket buffers take
    stalled = stalled_reader(server.port, SSE.format(cid), api.key, -1)
    slow = SlowReader(server.port, SSE.format(cid), api.key, -1)
    slow.start()
    try:
        opened = time.monotonic()
        wait_until(lambda: open_streams(server.base) == 2, 10, what="both streams")
        wait_until(lambda: open_streams(server.base) == 1, 4 * stall, what="the stalled stream ended")
        ended_after = time.monotonic() - opened
        assert stream_ends(server.base, "stalled") == 1 and stream_ends(server.base, "overflow") == 0
        # The slow reader, blocked behind its socket too, takes bytes every 0.1 s: it stays, past 2.5 stalls.
        held_at = slow.received
        wait_until(lambda: time.monotonic() - opened > 2.5 * stall and slow.received > held_at, 20,
                   what="the slow reader reading on")
        assert slow.ended is None and slow.is_alive(), slow.ended
        assert open_streams(server.base) == 1 and 0 < slow.received < 6_000_000  # still behind: still blocked
        print(f"stalled stream ended {ended_after:.1f} s after it opened (SSE_STALL_SECONDS={stall:g}); the slow "
              f"reader read {slow.received / MB:.1f} MB in {time.monotonic() - opened:.1f} s and stayed")
    finally:
        slow.close()
        stalled.close()
    wait_until(lambda: open_streams(server.base) == 0, 10, what="the slow reader's stream ended")
    assert "reason=stalled" in server.log()  # the stream's end line says why
    assert "Traceback" not in server.log() and "Socket error" not in server.log()


@pytest.mark.timeout(60)
def test_a_stream_stalled_in_its_live_phase_is_ended_without_an_overflow(start_server, make_key):
    # The hub writes live events to the socket itself; what does not fit waits in the stream's
    # buffer, which its greenlet sends: far fewer events than SSE_QUEUE_MAX, so no overflow.
    server = start_server(SSE_QUEUE_MAX="1000", SSE_STALL_SECONDS="2")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stalled = stalled_reader(server.port, SSE.format(cid), api.key, -1)  # nothing stored: live at once
    try:
        wait_until(lambda: open_streams(server.base) == 1, 10, what="the stalled reader's stream")
        Poster(api, cid, 30, 0, size=200_000).run()  # 6 MB live, then the conversation is quiet
        wait_until(lambda: open_streams(server.base) == 0, 10, what="the stalled stream ended")
        assert stream_ends(server.base, "stalled") == 1 and stream_ends(server.base, "overflow") == 0
        assert "Traceback" not in server.log() and "Socket error" not in server.log()
    finally:
        stalled.close()


def test_end_stalled_cuts_a_waiting_write_only_when_its_client_takes_nothing():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    unix = socket.socketpair()
    try:
        tcp, local = Subscriber("c", "u", "k", "", -1, conn), Subscriber("c", "u", "k", "", -1, unix[0])
        assert end_stalled([tcp, local], 2) == 0  # no write waits
        tcp.stalled_since = local.stalled_since = time.monotonic() - 1.5  # half the limit: looked at, not cut
        assert end_stalled([tcp, local], 2) == 0
        conn.sendall(b"x" * 1000)
        wait_until(lambda: bytes_acked(conn) >= tcp.acked + 1000, 5, what="the bytes acknowledged")
        tcp.stalled_since = local.stalled_since = time.monotonic() - 5
        assert end_stalled([tcp, local], 2) == 1  # the TCP client took bytes since: slow, not stalled
        assert tcp.end_reason is None and local.end_reason == "stalled"  # a Unix socket tells no progress
        tcp.acked_at -= 1.0  # then nothing acknowledged for half the limit
        assert end_stalled([tcp], 2) == 1 and tcp.end_reason == "stalled"
        client.settimeout(5)
        assert client.recv(2000) == b"x" * 1000 and client.recv(10) == b""  # cut off: the OS socket shut down
    finally:
        for sock in (listener, client, conn, *unix):
            sock.close()


# Connections opened and dropped ---------------------------------------------------------------


def _request(kind: int, cid: str, key: str) -> bytes:
    if kind == 3:  # a post whose body stops a tenth of the way through
        body = b'{"type": "user_message", "content": "' + b"y" * 60
        return (f"POST /api/conversations/{cid}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode() + body
    head = f"GET {SSE.format(cid)} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer {key}\r\n"
    return head.encode() if kind == 0 else head.encode() + b"\r\n"  # 0: the head never ends


def drop_one(port: int, n: int, cid: str, key: str) -> None:
    """Open a connection and drop it abruptly, in one of eight ways picked by `n`."""
    kind, rst = n % 4, (n // 4) % 2 == 1
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if rst:  # close() then sends a RST, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(_request(kind, cid, key))
        if kind in (1, 2):  # a stream: dropped right after its response head (2: after its first bytes)
            got = b""
            while b"\r\n\r\n" not in got and (data := sock.recv(4096)):
                got += data
            if kind == 2:
                while b"connection" not in got and (data := sock.recv(4096)):
                    got += data
    except OSError:
        pass  # a reset of ours racing the server's answer
    finally:
        sock.close()


def churn(port: int, count: int, cid: str, key: str, threads: int = 4) -> None:
    """`count` connections dropped abruptly, from `threads` clients at once."""
    def run(start: int) -> None:
        for n in range(start, count, threads):
            drop_one(port, n, cid, key)
    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers)


@pytest.mark.timeout(120)
def test_2000_connections_dropped_abruptly_leak_no_fd_greenlet_stream_or_redis_connection(start_server, make_key,
                                                                                         redis_client):
    server = start_server()  # the stream cap on (100 per user): its leases must come back too
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    pid = worker_pid(server.base)
    proc = psutil.Process(pid)

    def counts() -> dict[str, float]:
        with urllib.request.urlopen(server.base + "/healthz", timeout=5) as resp:
            streams = json.loads(resp.read())["streams"]
        return {
            "fds": proc.num_fds(),
            "greenlets": value(scrape(server.base + "/metrics"), "openhands_greenlets", pid=str(pid)),
            "redis": sum(named_connections(redis_client, pid).values()),
            "streams": streams,
            "leases": redis_client.zcard(user_streams_key("alice")),
        }

    churn(server.port, 200, cid, api.key)  # warm-up: the hub, the pool at the concurrency used
    slack = {"fds": 3, "greenlets": 3, "redis": 2, "streams": 0, "leases": 0}
    readings = [counts()]

    def steady() -> dict | None:  # two readings in a row alike: what the warm-up left has gone
        readings.append(counts())
        then, now = readings[-2:]
        return now if now == then and now["streams"] == 0 and now["leases"] == 0 else None

    before = wait_until(steady, 30, interval=0.5, what="the counts steady after the warm-up")
    # The gauge sees what a connection holds: 20 open streams are 20 greenlets (a leak would show).
    held = [open_stream(server.port, SSE.format(cid), bearer(api.key)) for _ in range(20)]
    assert all(s.status == 200 for s in held)
    assert counts()["greenlets"] >= before["greenlets"] + 20
    for s in held:
        s.close()
    started = time.monotonic()
    churn(server.port, 2000, cid, api.key)
    took = time.monotonic() - started
    during = counts()

    def settled() -> dict | None:
        now = counts()
        return now if all(now[k] <= before[k] + slack[k] for k in slack) else None

    try:
        after = wait_until(settled, 30, interval=0.5, what="the counts back where they were")
    except TimeoutError:
        raise AssertionError(f"before {before}, after {counts()}") from None
    print(f"2000 dropped connections in {took:.1f} s: before {before}, just after {during}, settled {after}")
    assert after["redis"] <= 16 + 2  # the request pool (REDIS_POOL_SIZE) and the hub's two, at most
    assert api.call("GET", f"/api/conversations/{cid}/events")[1]["events"] == []  # no cut post was stored
    assert api.call("GET", "/readyz")[0] == 200
    assert "Traceback" not in server.log()
