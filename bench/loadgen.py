"""Load generator for the SSE event-streaming contract (API.md), speaking only HTTP/1.1.

One run: create M conversations, open N SSE streams spread round-robin over them (split over
several receiver processes: file descriptors and CPU), post K events at rate R with a send
timestamp inside (``"sent_at": time.time()``), drain, and print one JSON document with:
connected / failed, deliveries expected / received / missing / duplicated / out of order,
latency post -> receipt (p50/p90/p99/max), deliveries/s, server RSS (process tree), Redis
connections (``CLIENT LIST``), CPU of server, Redis and the load generator itself.

Receivers are cheap per connection: an ``asyncio.Protocol`` (uvloop when installed) with its own
HTTP/1.1 + chunked + SSE framing; no JSON parsing per event. Each complete SSE block is scanned
once with a compiled bytes regex for the event's ``"id"`` and ``"sent_at"`` (the event JSON's
own id, which equals the SSE ``id:`` line; the flask-sse baseline omits ``id:`` for event 0).
Identical blocks (the same frames fanned out to many clients) are parsed once and cached.
Per connection: a bitmap of ids seen (duplicates, out-of-order, missing) and the last id (sent
back as ``Last-Event-ID`` on reconnect). Latency is taken from every S-th delivery of each
connection (stride S reported as ``latency_stride``; phase = connection index so every event is
sampled by some connections), binned at 0.1 ms.

Usage (standalone; bench/run.py drives it the same way):
    bench/.venv/bin/python bench/loadgen.py --url http://127.0.0.1:8010 --key x \
        --conversations 1 --clients 1000 --rate 50 --events 500
Progress goes to stderr; the JSON result to stdout (or --out FILE).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import re
import socket
import sys
import time
import urllib.request
from collections import Counter
from urllib.parse import urlsplit

try:
    import psutil
except ImportError:  # pragma: no cover - the bench venv has it
    psutil = None

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

EVENT_RX = re.compile(rb'"id": ?(\d+),[^\n]*?"sent_at": ?([0-9.]+)')
EVENT_ID_RX = re.compile(rb'"event_id": ?(\d+)')
CONV_ID_RX = re.compile(rb'"conversation_id": ?"([^"]+)"')
HIST_BINS = 200_000  # 0.1 ms bins up to 20 s; slower deliveries are kept exactly in `over`
MAX_PER_PROC = 6500  # streams per receiver process (fd limit 20,000; stay far below)
ONES = b"\x01" * 65536


def log(msg: str) -> None:
    print(f"[loadgen {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def new_loop() -> asyncio.AbstractEventLoop:
    loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


# ----------------------------------------------------------------------------- receivers


class Stream(asyncio.Protocol):
    """One SSE client. Reused across reconnects (the stats belong to the logical client)."""

    __slots__ = ("w", "idx", "cid", "conv", "phase", "tr", "st", "status", "hbuf", "chunked",
                 "left", "skip", "raw", "sse", "connected", "ever", "maxid", "seen", "recv",
                 "dup", "ooo", "extra", "closing", "attempts", "t_open", "dead")

    def __init__(self, w: Worker, idx: int, cid: str, conv: int):
        self.w, self.idx, self.cid, self.conv = w, idx, cid, conv
        self.phase = idx % w.stride
        self.seen = bytearray(w.kmax)
        self.maxid = -1
        self.recv = self.dup = self.ooo = self.extra = 0
        self.ever = False  # was connected at least once
        self.attempts = 0
        self.dead = False
        self.tr = None
        self._reset()

    def _reset(self):
        self.st = 0  # 0 headers, 1 body, 2 finished
        self.status = 0
        self.hbuf = b""
        self.chunked = False
        self.left = 0
        self.skip = 0
        self.raw = b""
        self.sse = b""
        self.connected = False
        self.closing = False

    # -- asyncio.Protocol
    def connection_made(self, tr):
        self._reset()
        self.tr = tr
        self.t_open = time.time()
        if self.maxid >= 0:
            extra = f"Last-Event-ID: {self.maxid}\r\n"
            q = ""
        else:
            extra = ""
            q = "?latest_event_id=-1"
        tr.write((f"GET /api/sse/conversations/{self.cid}/events{q} HTTP/1.1\r\n"
                  f"Host: {self.w.hostport}\r\nAuthorization: Bearer {self.w.key}\r\n"
                  f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n").encode())

    def connection_lost(self, exc):
        self.tr = None
        w = self.w
        if self.connected:
            w.open -= 1
            if not self.closing:
                w.lost += 1
                self.dead = True
        elif not self.closing and self.st != 2:
            w.fail(self, f"closed before stream ({type(exc).__name__ if exc else 'EOF'})")

    def data_received(self, data):
        if self.st == 0:
            hb = self.hbuf + data if self.hbuf else data
            i = hb.find(b"\r\n\r\n")
            if i < 0:
                if len(hb) > 65536:
                    self.w.fail(self, "header too large")
                    self.close()
                else:
                    self.hbuf = hb
                return
            head = hb[:i].split(b"\r\n")
            self.hbuf = b""
            try:
                self.status = int(head[0].split(None, 2)[1])
            except (IndexError, ValueError):
                self.status = -1
            if self.status != 200:
                self.w.fail(self, f"HTTP {self.status}")
                self.st = 2
                self.close()
                return
            for h in head[1:]:
                k, _, v = h.partition(b":")
                if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
                    self.chunked = True
            self.st = 1
            data = hb[i + 4:]
            if not data:
                return
        if self.chunked:
            # fast path: the read is exactly one whole chunk (one server write, the usual case)
            i = data.find(b"\r\n") if not (self.raw or self.left or self.skip) else -1
            if 0 < i < 10 and data[-2:] == b"\r\n":
                try:
                    end = i + 2 + int(data[:i], 16)
                except ValueError:
                    end = -1
                if end + 2 == len(data) and end > i + 2:
                    data = data[i + 2:end]
                else:
                    data = self._dechunk(data)
            else:
                data = self._dechunk(data)
            if not data:
                return
        sse = self.sse + data if self.sse else data
        k = sse.rfind(b"\n\n")
        if k >= 0:
            end = k + 2
        else:  # a server that ends lines with \r\n (sse-starlette): blocks end "\r\n\r\n"
            k = sse.rfind(b"\n\r\n")
            if k < 0:
                self.sse = sse
                return
            end = k + 3
        block = sse[:end]
        self.sse = sse[end:]
        if not self.connected:
            if b"event: connection" in block or b"event:connection" in block:
                self.connected = True
                w = self.w
                w.open += 1
                if self.ever:
                    w.reconn_ok += 1
                else:
                    self.ever = True
                    w.connected += 1
                    w.t_conn.append(time.time() - self.t_open)
        self.w.on_block(self, block)

    def _dechunk(self, buf: bytes) -> bytes:
        if self.raw:
            buf = self.raw + buf
            self.raw = b""
        out = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
                continue
            if self.left:
                take = min(self.left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.skip = 2
                continue
            i = buf.find(b"\r\n", pos)
            if i < 0:
                self.raw = buf[pos:]
                break
            try:
                size = int(buf[pos:i].split(b";", 1)[0], 16)
            except ValueError:
                self.w.fail(self, "bad chunk header")
                self.close()
                break
            pos = i + 2
            if size == 0:
                self.st = 2
                break
            self.left = size
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self):
        self.closing = True
        if self.tr is not None:
            self.tr.close()


class Worker:
    """A receiver process: holds its share of the streams, reports status, then final stats."""

    def __init__(self, conn, cfg: dict):
        self.pipe = conn
        self.cfg = cfg
        u = urlsplit(cfg["url"])
        self.host, self.port = u.hostname, u.port or 80
        self.hostport = f"{self.host}:{self.port}"
        self.key = cfg["key"]
        self.kmax = cfg["kmax"]
        self.stride = cfg["stride"]
        self.streams: list[Stream] = []
        self.connected = self.failed = self.open = self.lost = 0
        self.reconn_ok = self.reconn_fail = 0
        self.reasons: Counter = Counter()
        self.received = 0
        self.hist = [0] * HIST_BINS
        self.over: list[float] = []
        self.cache: dict[bytes, tuple] = {}
        self.t_first = self.t_last = 0.0
        self.t_conn: list[float] = []
        self.done = None

    def fail(self, s: Stream, reason: str):
        if s.ever:
            self.reconn_fail += 1
        else:
            self.failed += 1
        self.reasons[reason] += 1

    def on_block(self, s: Stream, block: bytes):
        parsed = self.cache.get(block)
        if parsed is None:
            ms = EVENT_RX.findall(block)
            if ms:
                ids = [int(a) for a, _ in ms]
                sent = [float(b) for _, b in ms]
                a, n = ids[0], len(ids)
                consec = ids[-1] - a == n - 1 and ids == list(range(a, a + n))
                parsed = (n, a, ids, sent, consec and n <= len(ONES), ONES[:n])
            else:
                parsed = (0, 0, (), (), True, b"")
            if len(self.cache) > 20000:
                self.cache.clear()
            self.cache[block] = parsed
        n, a, ids, sent, consec, ones = parsed
        if not n:
            return
        now = time.time()
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        self.received += n
        s.recv += n
        b = a + n - 1
        if consec and a == s.maxid + 1 and b < self.kmax:
            if n == 1:
                s.seen[a] = 1
            else:
                s.seen[a:b + 1] = ones
            s.maxid = b
        else:
            seen, kmax = s.seen, self.kmax
            for i in ids:
                if i >= kmax:
                    s.extra += 1
                elif seen[i]:
                    s.dup += 1
                else:
                    seen[i] = 1
                    if i < s.maxid:
                        s.ooo += 1
                if i > s.maxid:
                    s.maxid = i
        st = self.stride
        hist = self.hist
        for j in range((s.phase - a) % st, n, st):
            lat = now - sent[j]
            k = int(lat * 10000.0)
            if 0 <= k < HIST_BINS:
                hist[k] += 1
            elif k < 0:
                hist[0] += 1
            else:
                self.over.append(lat)

    async def connect(self, s: Stream, sem: asyncio.Semaphore):
        async with sem:
            s.attempts += 1
            try:
                await asyncio.wait_for(
                    self.loop.create_connection(lambda: s, self.host, self.port), 15)
            except (TimeoutError, OSError) as e:
                self.fail(s, f"connect: {type(e).__name__}: {getattr(e, 'strerror', '') or e}")
                return
            # wait for the opening event (bounded)
            t_end = time.time() + self.cfg["open_wait"]
            while not s.connected and s.tr is not None and s.st != 2 and time.time() < t_end:
                await asyncio.sleep(0.05)
            if not s.connected and s.tr is not None and s.st != 2:
                self.fail(s, f"no opening event within {self.cfg['open_wait']:g} s")
                s.close()

    async def open_streams(self, streams: list[Stream], rate: float):
        sem = asyncio.Semaphore(self.cfg["inflight"])
        t0 = time.time()
        tasks = []
        for i, s in enumerate(streams):
            due = t0 + i / rate
            d = due - time.time()
            if d > 0:
                await asyncio.sleep(d)
            tasks.append(asyncio.ensure_future(self.connect(s, sem)))
        if tasks:
            await asyncio.gather(*tasks)
        try:
            self.pipe.send({"status": self.status()})  # at once: it ends the opening CPU window
        except OSError:
            pass

    def status(self) -> dict:
        return {"connected": self.connected, "failed": self.failed, "open": self.open,
                "lost": self.lost, "received": self.received, "reconn_ok": self.reconn_ok,
                "reconn_fail": self.reconn_fail}

    async def drop_and_resume(self, fraction: float, pause: float, rate: float):
        step = max(1, round(1 / fraction)) if fraction > 0 else 0
        victims = [s for s in self.streams if step and s.idx % step == 0 and s.tr is not None]
        for s in victims:
            s.close()
        await asyncio.sleep(pause)
        await self.open_streams(victims, rate)

    def on_cmd(self):
        try:
            msg = self.pipe.recv()
        except EOFError:
            self.done.set_result(None)
            return
        cmd = msg["cmd"]
        if cmd == "open":
            self.streams = [Stream(self, idx, cid, conv) for idx, cid, conv in msg["streams"]]
            asyncio.ensure_future(self.open_streams(self.streams, msg["rate"]))
        elif cmd == "drop":
            asyncio.ensure_future(self.drop_and_resume(msg["fraction"], msg["pause"], msg["rate"]))
        elif cmd == "finish":
            if not self.done.done():
                self.done.set_result(msg)

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        watch_pipe(self.loop, self.pipe, self.on_cmd)
        hard = time.time() + self.cfg["max_seconds"]
        while not self.done.done() and time.time() < hard:
            self.pipe.send({"status": self.status()})
            await asyncio.wait([self.done], timeout=0.5)
        msg = self.done.result() if self.done.done() else None
        self.loop.remove_reader(self.pipe.fileno())
        for s in self.streams:
            s.close()
        exp = (msg or {}).get("expected") or {}
        missing = complete = uniq_total = dup = ooo = extra = dead = 0
        recv_per = []
        for s in self.streams:
            n = min(exp.get(s.conv, 0), self.kmax)
            got = s.seen[:n].count(1)
            missing += n - got
            if s.ever and got == n:
                complete += 1
            uniq_total += s.seen.count(1)
            dup += s.dup
            ooo += s.ooo
            extra += s.extra
            dead += s.dead
            recv_per.append(s.recv)
        await asyncio.sleep(0.05)
        self.pipe.send({"final": {
            **self.status(), "streams": len(self.streams), "missing": missing,
            "complete_streams": complete, "unique": uniq_total, "dup": dup, "ooo": ooo,
            "extra": extra, "dead_streams": dead, "reasons": dict(self.reasons),
            "hist": {i: c for i, c in enumerate(self.hist) if c}, "over": self.over,
            "t_first": self.t_first, "t_last": self.t_last,
            "min_recv": min(recv_per) if recv_per else 0,
            "t_conn_p99": sorted(self.t_conn)[int(len(self.t_conn) * 0.99)] if self.t_conn else 0,
            "cpu": time.process_time()}})


def watch_pipe(loop, conn, cb) -> None:
    """add_reader for a multiprocessing Connection, with the fd kept blocking.

    libuv (uvloop) puts the fd in non-blocking mode, and Connection.recv()/send() of a message
    larger than the socket buffer then fail half-way with EAGAIN. A readable fd means a message
    is coming, so a blocking read is short.
    """
    loop.add_reader(conn.fileno(), cb)
    os.set_blocking(conn.fileno(), True)


def worker_main(conn, cfg):
    loop = new_loop()
    try:
        loop.run_until_complete(Worker(conn, cfg).run())
    finally:
        conn.close()


# ----------------------------------------------------------------------------- HTTP client


class Http:
    """Minimal keep-alive HTTP/1.1 client for the JSON routes."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port, self.key = host, port, key
        self.r = self.w = None

    async def _open(self):
        self.r, self.w = await asyncio.open_connection(self.host, self.port)
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None

    async def request(self, method: str, path: str, body: bytes = b"{}") -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.w is None or self.r.at_eof()
            if fresh:
                self.close()
                await self._open()
            self.w.write(
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            try:
                head = await self.r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                # a kept-alive connection closed by the server before any response byte: retry once
                self.close()
                if attempt == 0 and not fresh and not getattr(e, "partial", b""):
                    continue
                raise
            lines = head.split(b"\r\n")
            status = int(lines[0].split(None, 2)[1])
            clen, chunked, close = None, False, False
            for h in lines[1:]:
                k, _, v = h.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    clen = int(v)
                elif k == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
                elif k == b"connection" and b"close" in v.lower():
                    close = True
            if chunked:
                parts = []
                while True:
                    size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                    data = await self.r.readexactly(size + 2)
                    if size == 0:
                        break
                    parts.append(data[:-2])
                data = b"".join(parts)
            elif clen is not None:
                data = await self.r.readexactly(clen)
            else:
                data = await self.r.read()
                close = True
            if close:
                self.close()
            return status, data
        raise ConnectionError("unreachable")


# ----------------------------------------------------------------------------- measurement


def proc_tree(pid):
    if not pid or psutil is None:
        return []
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def tree_rss(pid) -> int:
    tot = 0
    for p in proc_tree(pid):
        try:
            tot += p.memory_info().rss
        except psutil.Error:
            pass
    return tot


def tree_cpu(pid) -> float:
    tot = 0.0
    for p in proc_tree(pid):
        try:
            t = p.cpu_times()
            tot += t.user + t.system
        except psutil.Error:
            pass
    return tot


def fetch_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}


def redis_cmd(port: int, *args: str) -> bytes | None:
    """One RESP command on a fresh connection; returns the raw bulk/simple reply payload."""
    if not port:
        return None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            req = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            s.sendall(req.encode())
            buf = b""
            while b"\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    return None
                buf += d
            line, _, rest = buf.partition(b"\r\n")
            if line[:1] != b"$":
                return line[1:]
            n = int(line[1:])
            while len(rest) < n + 2:
                d = s.recv(1 << 20)
                if not d:
                    break
                rest += d
            return rest[:n]
    except OSError:
        return None


def redis_clients(ports: list[int]) -> int | None:
    """Clients in CLIENT LIST, minus the connection asking (summed over a Cluster's masters)."""
    outs = [redis_cmd(port, "CLIENT", "LIST") for port in ports]
    if not ports or any(out is None for out in outs):
        return None
    return sum(max(0, out.count(b"\n") - 1) for out in outs)


def redis_streaming_clients(ports: list[int]) -> int | None:
    """Clients our server opened for streaming (CLIENT SETNAME oh-sse:<pid>:hub-*); 0 for the peers."""
    outs = [redis_cmd(port, "CLIENT", "LIST") for port in ports]
    if not ports or any(out is None for out in outs):
        return None
    return sum(1 for out in outs for line in out.split(b"\n") if b":hub-" in line)


class Meter:
    """CPU / RSS bookkeeping of server tree, Redis and the load generator's own processes."""

    def __init__(self, server_pid, redis_pids, redis_ports):
        self.spid, self.rpids, self.rports = server_pid, redis_pids, redis_ports
        self.rss_max = 0

    def cpu(self, worker_pids) -> dict:
        me = time.process_time()
        lg = me + sum(tree_cpu(p) for p in worker_pids)
        m = psutil.cpu_times() if psutil else None
        busy = (sum(m) - m.idle - getattr(m, "iowait", 0.0)) if m else 0.0
        return {"t": time.time(), "server": tree_cpu(self.spid), "redis": sum(tree_cpu(p) for p in self.rpids),
                "loadgen": lg, "machine": busy}

    def rss(self) -> int:
        r = tree_rss(self.spid)
        self.rss_max = max(self.rss_max, r)
        return r


# ----------------------------------------------------------------------------- the run


def percentiles(hist: Counter, over: list[float]) -> dict:
    total = sum(hist.values()) + len(over)
    if not total:
        return {"samples": 0}
    keys = sorted(hist)
    over = sorted(over)
    out = {"samples": total}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        target = max(1, math.ceil(q * total))
        acc = 0
        val = None
        for k in keys:
            acc += hist[k]
            if acc >= target:
                val = (k + 0.5) / 10.0  # ms, bin centre
                break
        if val is None:
            val = over[target - acc - 1] * 1000.0
        out[name] = round(val, 2)
    return out


async def amain(a) -> dict:
    u = urlsplit(a.url)
    host, port = u.hostname, u.port or 80
    res: dict = {"config": {k: v for k, v in vars(a).items() if k not in ("key", "out")}}
    meter = Meter(a.server_pid, a.redis_pid, a.redis_port)
    t_start = time.time()
    hard_end = t_start + a.max_seconds

    # --- conversations (over a few keep-alive connections when there are many)
    convs: list[str] = []
    t0 = time.time()
    c_cpu0 = meter.cpu([])
    todo = {"n": a.conversations}

    async def creator():
        http = Http(host, port, a.key)
        try:
            while todo["n"] > 0:
                todo["n"] -= 1
                st, body = await http.request("POST", "/api/conversations", b"{}")
                m = CONV_ID_RX.search(body)
                if st != 200 or not m:
                    raise SystemExit(f"create conversation failed: HTTP {st} {body[:200]!r}")
                convs.append(m.group(1).decode())
        finally:
            http.close()

    await asyncio.gather(*(creator() for _ in range(min(8, max(1, a.conversations // 50)))))
    c_cpu1 = meter.cpu([])
    res["create"] = {"conversations": len(convs), "seconds": round(time.time() - t0, 2),
                     "cpu_s": {k: round(c_cpu1[k] - c_cpu0[k], 3) for k in ("server", "redis")}}
    log(f"created {len(convs)} conversations in {time.time() - t0:.1f}s")
    await asyncio.sleep(0.3)
    rss0 = meter.rss()
    redis0 = redis_clients(a.redis_port)

    # --- receivers
    nproc = max(a.procs, math.ceil(a.clients / MAX_PER_PROC)) if a.clients else 0
    per_conv_events = math.ceil(a.events / max(1, len(convs)))
    kmax = per_conv_events + 64
    total_samples = a.clients * per_conv_events
    stride = a.stride or max(1, math.ceil(total_samples / 2_000_000))
    res["latency_stride"] = stride
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    wcfg = {"url": a.url, "key": a.key, "kmax": kmax, "stride": stride,
            "max_seconds": a.max_seconds + 30, "inflight": a.inflight, "open_wait": a.open_wait}
    for _ in range(nproc):
        pa, pb = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(pb, wcfg), daemon=True)
        p.start()
        pb.close()
        procs.append(p)
        pipes.append(pa)
    wpids = [p.pid for p in procs]
    status = [dict(connected=0, failed=0, open=0, lost=0, received=0, reconn_ok=0,
                   reconn_fail=0) for _ in procs]
    finals: list = [None] * nproc
    loop = asyncio.get_running_loop()

    def reader(i):
        def cb():
            try:
                msg = pipes[i].recv()
            except (EOFError, OSError) as e:
                loop.remove_reader(pipes[i].fileno())
                if finals[i] is None:
                    log(f"receiver process {i}: pipe closed without a result ({e!r})")
                return
            if "status" in msg:
                status[i] = msg["status"]
            else:
                finals[i] = msg["final"]
        return cb

    for i, pp in enumerate(pipes):
        watch_pipe(loop, pp, reader(i))

    def agg(key):
        return sum(s[key] for s in status)

    assign: list[list] = [[] for _ in procs]
    conv_of_stream = []
    for idx in range(a.clients):
        c = idx % len(convs)
        conv_of_stream.append(c)
        assign[idx % nproc].append((idx, convs[c], c))
    o_cpu0 = meter.cpu(wpids)
    t_open = time.time()
    for i, pp in enumerate(pipes):
        pp.send({"cmd": "open", "streams": assign[i], "rate": a.connect_rate / nproc})
    last_print = 0.0
    while time.time() < hard_end:
        done = agg("connected") + agg("failed")
        if time.time() - last_print > 2:
            last_print = time.time()
            log(f"streams: {agg('connected')} connected, {agg('failed')} failed / {a.clients}")
        if done >= a.clients:
            break
        if time.time() - t_open > a.open_timeout:
            log("open timeout")
            break
        await asyncio.sleep(0.1)
    o_cpu1 = meter.cpu(wpids)
    t_opened = time.time() - t_open
    log(f"streams: {agg('connected')} connected, {agg('failed')} failed in {t_opened:.1f}s")
    await asyncio.sleep(a.settle)
    s_cpu = meter.cpu(wpids)  # streams held, nothing posted: the server's idle CPU with N open
    s_win = s_cpu["t"] - o_cpu1["t"]
    rssN = meter.rss()
    redisN = redis_clients(a.redis_port)
    # CPU seconds spent while the streams were being opened (from the first connect to the
    # status report that counted the last one open or failed: <= 0.5 s after it)
    o_cpu = {k: round(o_cpu1[k] - o_cpu0[k], 3) for k in ("server", "redis", "loadgen", "machine")}
    res["open"] = {"seconds": round(t_opened, 2), "connected": agg("connected"),
                   "failed": agg("failed"), "cpu_s": o_cpu,
                   "server_cpu_ms_per_stream": round(1000 * o_cpu["server"] / agg("connected"), 4)
                   if agg("connected") else None}
    res["settle_cpu_pct"] = {k: round(100 * (s_cpu[k] - o_cpu1[k]) / s_win, 1)
                             for k in ("server", "redis")} if s_win > 0 else {}
    res["rss"] = {"at_0": rss0, "at_n": rssN}
    if a.clients:
        res["rss"]["per_stream_kb"] = round((rssN - rss0) / a.clients / 1024, 2)
    res["redis_clients"] = {"at_0": redis0, "at_n": redisN,
                            "streaming_at_n": redis_streaming_clients(a.redis_port)}
    if a.health_url:
        res["healthz_at_n"] = await loop.run_in_executor(None, fetch_json, a.health_url)

    # --- post
    cpu0 = meter.cpu(wpids)
    posted = await post_events(a, host, port, convs, pipes, status, meter, res, hard_end)
    # --- drain
    expected = {}
    for c, n in posted["next_id"].items():
        expected[c] = n
    exp_total = sum(expected.get(conv_of_stream[i], 0) for i in range(a.clients))
    t_d = time.time()
    last_recv, last_change = agg("received"), time.time()
    while time.time() < hard_end and time.time() - t_d < a.drain:
        r = agg("received")
        if r >= exp_total:
            break
        if r != last_recv:
            last_recv, last_change = r, time.time()
        elif time.time() - last_change > a.idle_stop:
            log(f"drain: no progress for {a.idle_stop}s")
            break
        await asyncio.sleep(0.1)
    cpu1 = meter.cpu(wpids)
    rss_end = meter.rss()
    redis_end = redis_clients(a.redis_port)
    res["rss"].update(at_end=rss_end, max=meter.rss_max)
    res["redis_clients"]["at_end"] = redis_end

    # --- finish
    for pp in pipes:
        try:
            pp.send({"cmd": "finish", "expected": expected})
        except OSError:
            pass
    t_f = time.time()
    while any(f is None for f in finals) and time.time() - t_f < 30:
        await asyncio.sleep(0.05)
    for pp in pipes:
        try:
            loop.remove_reader(pp.fileno())
        except (ValueError, OSError):
            pass
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    fin = [f for f in finals if f]
    if len(fin) != nproc:
        res["warning"] = f"{nproc - len(fin)} receiver process(es) gave no result"
    hist: Counter = Counter()
    over: list[float] = []
    for f in fin:
        hist.update(f.pop("hist"))
        over.extend(f.pop("over"))
    tot = Counter()
    reasons: Counter = Counter()
    for f in fin:
        reasons.update(f.pop("reasons"))
        for k, v in f.items():
            if isinstance(v, (int, float)) and k not in ("t_first", "t_last", "t_conn_p99"):
                tot[k] += v
    received = tot["received"]
    t_first_post = posted["t0"]
    t_last = max((f["t_last"] for f in fin), default=0)
    win = cpu1["t"] - cpu0["t"]
    res["deliveries"] = {
        "expected": exp_total, "received": received, "unique": tot["unique"],
        "missing": tot["missing"], "duplicated": tot["dup"], "out_of_order": tot["ooo"],
        "unexpected_ids": tot["extra"], "complete_streams": tot["complete_streams"],
        "min_per_stream": min((f["min_recv"] for f in fin), default=0),
        "per_s": round(received / (t_last - t_first_post), 1) if t_last > t_first_post else 0.0,
    }
    res["streams"] = {"clients": a.clients, "connected": tot["connected"], "failed": tot["failed"],
                      "lost": tot["lost"], "dead_at_end": tot["dead_streams"],
                      "reconnected": tot["reconn_ok"], "reconnect_failed": tot["reconn_fail"],
                      "fail_reasons": dict(reasons.most_common(5)),
                      "open_latency_p99_s": round(max((f["t_conn_p99"] for f in fin), default=0), 3)}
    res["latency_ms"] = percentiles(hist, over)
    res["cpu_pct"] = {k: round(100 * (cpu1[k] - cpu0[k]) / win, 1) if win > 0 else None
                      for k in ("server", "redis", "loadgen", "machine")}
    if win > 0:  # everything else on the machine (other jobs), 100 = one core
        c = res["cpu_pct"]
        c["other"] = round(max(0.0, c["machine"] - c["server"] - c["redis"] - c["loadgen"]), 1)
    res["cpu_window_s"] = round(win, 2)
    res["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 3) for k in ("server", "redis", "loadgen", "machine")}
    ok_posts = res["post"]["ok"]
    res["redis_cpu_us_per_event"] = (round(1e6 * res["cpu_s"]["redis"] / ok_posts, 1)
                                     if ok_posts and a.redis_pid else None)
    res["loadgen_procs"] = nproc + 1
    res["wall_s"] = round(time.time() - t_start, 1)
    return res


async def post_events(a, host, port, convs, pipes, status, meter, res, hard_end) -> dict:
    """Post a.events events at a.rate over the conversations round-robin, paced, bounded."""
    K, R = a.events, a.rate
    next_id: dict[int, int] = {}
    ok = fail = 0
    lat: list[float] = []
    errors: Counter = Counter()
    state = {"i": 0, "t_done": 0.0}
    t0 = time.time() + 0.05
    cap = t0 + a.post_cap
    storm_at = t0 + a.storm_at * (K / R) if a.storm else None
    redis_mid = None

    async def one(h: Http):
        nonlocal ok, fail
        while True:
            i = state["i"]
            if i >= K:
                return
            state["i"] = i + 1
            due = t0 + i / R
            now = time.time()
            if now > cap or now > hard_end:
                return
            if due > now:
                await asyncio.sleep(due - now)
            c = i % len(convs)
            ts = time.time()
            body = b'{"type":"user_message","content":"bench %d","sent_at":%.6f}' % (i, ts)
            try:
                st, data = await asyncio.wait_for(
                    h.request("POST", f"/api/conversations/{convs[c]}/events", body), 10)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                h.close()
                fail += 1
                errors[type(e).__name__] += 1
                continue
            t1 = time.time()
            m = EVENT_ID_RX.search(data)
            if st == 200 and m:
                ok += 1
                eid = int(m.group(1))
                if eid + 1 > next_id.get(c, 0):
                    next_id[c] = eid + 1
                lat.append(t1 - ts)
                state["t_done"] = t1
            else:
                fail += 1
                errors[f"HTTP {st}"] += 1

    posters = [Http(host, port, a.key) for _ in range(max(1, min(a.posters, K)))]
    tasks = [asyncio.ensure_future(one(h)) for h in posters]
    log(f"posting {K} events at {R}/s over {len(convs)} conversation(s)")
    last = time.time()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.1)
        now = time.time()
        if storm_at and now >= storm_at:
            storm_at = None
            log(f"storm: dropping {a.storm:.0%} of streams for {a.storm_pause}s, then resuming "
                "with Last-Event-ID")
            for pp in pipes:
                pp.send({"cmd": "drop", "fraction": a.storm, "pause": a.storm_pause,
                         "rate": a.connect_rate / len(pipes)})
        if redis_mid is None and now - t0 > (K / R) / 2:
            redis_mid = redis_clients(a.redis_port)
            meter.rss()
        if now - last > 2:
            last = now
            meter.rss()
            log(f"posted {ok}/{K} ({fail} failed), received {sum(s['received'] for s in status)}"
                f", open {sum(s['open'] for s in status)}")
    for h in posters:
        h.close()
    el = (state["t_done"] or time.time()) - t0
    lat.sort()
    res["post"] = {
        "offered_rate": R, "events": K, "ok": ok, "failed": fail, "errors": dict(errors),
        "achieved_rate": round(ok / el, 1) if el > 0 else 0.0, "seconds": round(el, 2),
        "post_latency_ms": {"p50": round(lat[len(lat) // 2] * 1000, 1),
                            "p99": round(lat[int(len(lat) * 0.99)] * 1000, 1)} if lat else {},
    }
    res["redis_clients"]["mid_post"] = redis_mid
    log(f"posted {ok}/{K} in {el:.1f}s ({res['post']['achieved_rate']}/s), {fail} failed")
    return {"t0": t0, "next_id": next_id}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="server base URL, http://127.0.0.1:PORT")
    p.add_argument("--key", default="bench", help="API key (Bearer)")
    p.add_argument("--conversations", type=int, default=1)
    p.add_argument("--clients", type=int, default=100, help="SSE streams in all")
    p.add_argument("--rate", type=float, default=50.0, help="posts/s offered")
    p.add_argument("--events", type=int, default=100, help="events to post in all (K)")
    p.add_argument("--posters", type=int, default=16, help="concurrent keep-alive post connections")
    p.add_argument("--procs", type=int, default=2, help="receiver processes (at least)")
    p.add_argument("--connect-rate", type=float, default=2000.0, help="new streams/s in all")
    p.add_argument("--open-timeout", type=float, default=60.0, help="for all streams to open")
    p.add_argument("--open-wait", type=float, default=30.0,
                   help="per stream: connect + opening event")
    p.add_argument("--inflight", type=int, default=100,
                   help="streams opening at once, per receiver process")
    p.add_argument("--settle", type=float, default=1.0, help="wait after streams are open (s)")
    p.add_argument("--post-cap", type=float, default=60.0, help="stop posting after (s)")
    p.add_argument("--drain", type=float, default=20.0, help="max wait for deliveries after posting")
    p.add_argument("--idle-stop", type=float, default=3.0, help="end drain after no progress (s)")
    p.add_argument("--stride", type=int, default=0, help="latency sampling stride (0 = auto)")
    p.add_argument("--storm", type=float, default=0.0, help="fraction of streams to drop mid-run")
    p.add_argument("--storm-at", type=float, default=0.4, help="when, as fraction of posting time")
    p.add_argument("--storm-pause", type=float, default=1.0, help="seconds before resuming")
    p.add_argument("--server-pid", type=int, default=0, help="gunicorn master pid (RSS, CPU)")
    # Comma-separated on a Cluster (its masters); CPU and connections are summed over them.
    p.add_argument("--redis-pid", type=lambda v: [int(x) for x in v.split(",") if int(x)], default=[])
    p.add_argument("--redis-port", type=lambda v: [int(x) for x in v.split(",") if int(x)], default=[])
    p.add_argument("--health-url", help="GET this JSON once all streams are open (ours: /healthz)")
    p.add_argument("--max-seconds", type=float, default=180.0, help="hard cap on the whole run")
    p.add_argument("--out", help="write the JSON result here instead of stdout")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    loop = new_loop()
    try:
        res = loop.run_until_complete(amain(a))
    finally:
        loop.close()
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
