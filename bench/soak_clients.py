"""The soak's load: SSE clients that reconnect at random, a steady poster, and the end-of-run checks.

One asyncio (uvloop) process. Each client is loadgen's `Stream` (its HTTP/chunked/SSE framing and
its `Last-Event-ID` on reconnect), driven by a loop here that closes it after a random lifetime
and reopens it. Every `id:` line a client gets is recorded in a per-client bitmap, so a gap or a
duplicate is seen exactly, and checked at the end against the conversation's REST listing.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter

from loadgen import EVENT_RX, Http, Stream

ID_RX = re.compile(rb"(?m)^id: ?(\d+)\r?$")
LAT_BINS = 100_000  # 0.1 ms bins up to 10 s; slower ones kept exactly


class Latency:
    """A latency histogram (0.1 ms bins) with the window since the last sample kept apart."""

    def __init__(self) -> None:
        self.all: Counter = Counter()
        self.window: list[float] = []

    def add(self, seconds: float) -> None:
        self.all[min(int(seconds * 10_000), LAT_BINS)] += 1
        self.window.append(seconds)

    def take_window(self) -> dict:
        """p50/p99/max (ms) of the values since the last call, then forget them."""
        w, self.window = sorted(self.window), []
        if not w:
            return {"n": 0}
        return {"n": len(w), "p50": round(w[len(w) // 2] * 1000, 1),
                "p99": round(w[min(len(w) - 1, int(len(w) * 0.99))] * 1000, 1), "max": round(w[-1] * 1000, 1)}

    def summary(self) -> dict:
        total = sum(self.all.values())
        out: dict = {"n": total}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            acc, target = 0, max(1, int(q * total + 0.999999))
            for k in sorted(self.all):
                acc += self.all[k]
                if acc >= target:
                    out[name] = round((k + 0.5) / 10, 1) if k < LAT_BINS else ">10000"
                    break
        return out


class Phase(asyncio.Event):
    """Set when posting stops: clients stop reconnecting, and reopen a closed stream until `deadline`."""

    deadline = float("inf")


class Tally:
    """Counts shared by every client of the run (the first-receipt latency too)."""

    def __init__(self) -> None:
        self.open = self.delivered = self.dup = self.gaps = 0
        self.opened = self.reopened = self.server_ended = 0
        self.reasons: Counter = Counter()
        self.first_seen: dict[int, bytearray] = {}  # conversation index -> ids some client already got
        self.delivery = Latency()  # post sent -> the first client to get it


class UserClients:
    """The `w` loadgen's Stream expects: one per user (its key), the counts going to the shared Tally."""

    stride = 1
    kmax = 1  # Stream's own bitmap is replaced by a growing one (see SoakClient)

    def __init__(self, hostport: str, key: str, tally: Tally):
        self.hostport, self.key, self.t = hostport, key, tally
        self.connected = self.reconn_ok = 0
        self.t_conn: list[float] = []

    @property
    def open(self) -> int:
        return self.t.open

    @open.setter
    def open(self, v: int) -> None:
        self.t.open = v

    @property
    def lost(self) -> int:
        return self.t.server_ended

    @lost.setter
    def lost(self, v: int) -> None:
        self.t.server_ended = v  # a stream the server ended (not closed by us): counted, reopened

    def fail(self, s: Stream, reason: str) -> None:
        self.t.reasons[reason] += 1

    def on_block(self, s: Stream, block: bytes) -> None:
        ids = ID_RX.findall(block)
        if not ids:
            return
        t, seen = self.t, s.seen
        now = time.time()
        for raw in ids:
            i = int(raw)
            if i >= len(seen):
                seen.extend(bytes(i + 256 - len(seen)))
            if seen[i]:
                t.dup += 1
            else:
                seen[i] = 1
                if i != s.maxid + 1:
                    t.gaps += 1  # out of order or skipped: the final check says which ids are missing
            if i > s.maxid:
                s.maxid = i
            t.delivered += 1
        first = t.first_seen.setdefault(s.conv, bytearray())
        for raw, sent in EVENT_RX.findall(block):  # the posts carry sent_at: first receipt = delivery latency
            i = int(raw)
            if i >= len(first):
                first.extend(bytes(i + 256 - len(first)))
            if not first[i]:
                first[i] = 1
                t.delivery.add(now - float(sent))


class SoakClient:
    """One logical client: a loadgen Stream reopened after each random lifetime, resuming with Last-Event-ID."""

    def __init__(self, users: UserClients, idx: int, cid: str, conv: int):
        self.s = Stream(users, idx, cid, conv)
        self.s.seen = bytearray(256)
        self.users = users

    async def run(self, loop, host: str, port: int, life: tuple[float, float], stop: Phase,
                  rng: random.Random) -> None:
        """Open, hold for a random lifetime (or until the server ends it), close, pause, again, until stop."""
        s, t = self.s, self.users.t
        await asyncio.sleep(rng.uniform(0, 5))  # spread the first opens over 5 s
        while True:
            if stop.is_set() and (self.is_open or time.monotonic() > stop.deadline):
                return  # open for the drain (or given up on: the final check counts what it lacks)
            if not await self.open(loop, host, port):
                await asyncio.sleep(rng.uniform(0.5, 2))
                continue
            t.reopened += s.attempts > 1
            t.opened += 1
            deadline = time.monotonic() + rng.uniform(*life)
            while not stop.is_set() and s.tr is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            if stop.is_set() and s.tr is not None:
                return  # stays open for the drain
            s.close()
            # the old transport's connection_lost must run before the next connection_made reuses s
            while s.tr is not None:
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0, 1))

    @property
    def is_open(self) -> bool:
        """Connected now (Stream keeps `connected` from its last connection until the next one is made)."""
        return self.s.tr is not None and self.s.connected

    async def open(self, loop, host: str, port: int) -> bool:
        """Connect and wait (bounded) for the connection event."""
        s = self.s
        s.attempts += 1
        try:
            await asyncio.wait_for(loop.create_connection(lambda: s, host, port), 15)
        except (TimeoutError, OSError) as e:
            self.users.fail(s, f"connect: {type(e).__name__}")
            return False
        t_end = time.monotonic() + 15
        while not s.connected and s.tr is not None and s.st != 2 and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        if not s.connected:
            if s.tr is not None and s.st != 2:
                self.users.fail(s, "no connection event within 15 s")
            s.close()
            while s.tr is not None:
                await asyncio.sleep(0.05)
            return False
        return True


class Poster:
    """Posts user_message at a steady rate, round-robin over the conversations, each on its owner's key."""

    def __init__(self, host: str, port: int, keys: list[str], convs: list[tuple[str, int]], rate: float,
                 inflight: int = 16):
        self.pools = {u: asyncio.Queue() for u in range(len(keys))}
        for u, key in enumerate(keys):
            for _ in range(2):
                self.pools[u].put_nowait(Http(host, port, key))
        self.convs, self.rate = convs, rate
        self.sem = asyncio.Semaphore(inflight)
        self.acked: dict[int, list[int]] = {i: [] for i in range(len(convs))}
        self.sent = self.ok = self.behind = 0
        self.errors: Counter = Counter()
        self.latency = Latency()  # POST -> its 200
        self.tasks: set = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Event i is due at t0 + i/rate; when `inflight` posts wait on the server, it waits too (closed loop)."""
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            d = t0 + i / self.rate - time.monotonic()
            if d > 0:
                await asyncio.sleep(d)
            elif d < -1:
                self.behind += 1  # more than a second late: the rate is not sustained
            await self.sem.acquire()
            task = asyncio.ensure_future(self.post(i % len(self.convs)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            i += 1

    async def post(self, conv: int) -> None:
        cid, user = self.convs[conv]
        http = await self.pools[user].get()
        try:
            self.sent += 1
            t0 = time.monotonic()
            body = json.dumps({"type": "user_message", "content": f"soak {self.sent}", "sent_at": time.time()})
            try:
                status, data = await asyncio.wait_for(
                    http.request("POST", f"/api/conversations/{cid}/events", body.encode()), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                # the write may have run: never re-sent; the final check shows whether it was stored
                self.errors[f"no answer: {type(e).__name__}"] += 1
                http.close()
                return
            if status != 200:
                self.errors[f"HTTP {status}"] += 1
                return
            self.latency.add(time.monotonic() - t0)
            self.acked[conv].append(json.loads(data)["event_id"])
            self.ok += 1
        finally:
            self.pools[user].put_nowait(http)
            self.sem.release()

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


async def listing(http: Http, cid: str) -> list[dict]:
    """Every stored event of a conversation (the REST listing, pages of 1,000)."""
    out: list[dict] = []
    while True:
        status, data = await http.request("GET", f"/api/conversations/{cid}/events?start_id={len(out)}&limit=1000")
        if status != 200:
            raise RuntimeError(f"listing {cid[:6]}…: HTTP {status}")
        page = json.loads(data)
        out.extend(page["events"])
        if not page["has_more"] or not page["events"]:
            return out


def check(events: list[dict], acked: list[int], clients: list[SoakClient]) -> dict:
    """One conversation at the end: ids 0..last, acked posts stored and answered once, every client exact."""
    ids = [e["id"] for e in events]
    last = len(ids) - 1
    by_id = {e["id"]: e for e in events}
    answers = Counter(e.get("cause") for e in events if e.get("type") == "agent_message")
    out = {"last_id": last, "listing_not_consecutive": ids != list(range(len(ids))),
           "acked_not_stored": sum(1 for i in acked if by_id.get(i, {}).get("type") != "user_message"),
           "acked_not_answered_once": sum(1 for i in acked if answers.get(i) != 1),
           "client_missing": 0, "client_extra": 0, "clients_incomplete": 0, "incomplete": []}
    for c in clients:
        seen = c.s.seen
        got = seen[:last + 1].count(1)
        missing = last + 1 - got
        extra = seen[last + 1:].count(1)
        out["client_missing"] += missing
        out["client_extra"] += extra
        out["clients_incomplete"] += bool(missing or extra)
        if missing or extra:  # what an investigation needs: which ids, and the client's state
            out["incomplete"].append({"client": c.s.idx, "last_id": last, "maxid": c.s.maxid, "open": c.is_open,
                                      "missing_ids": [i for i in range(last + 1) if i >= len(seen) or not seen[i]][:20],
                                      "extra": extra, "attempts": c.s.attempts})
    return out
