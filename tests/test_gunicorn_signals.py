"""Graceful stop and reloads of a real gunicorn with 50 streaming clients and steady posts (issue 10).

SIGHUP (new workers, same master), SIGTERM (the server stops; a new one is started on the same
port, as systemd's restart does) and SIGUSR2 (a new master re-executed on the same listening
socket) followed by SIGTERM to the old master. Each time, every stream open at the signal ends
promptly (far under GRACEFUL_TIMEOUT), every client reconnects with `Last-Event-ID` and ends with
every event of its conversation exactly once and in order, equal to the REST listing, and every
post gets its 200. Posts carry an `Idempotency-Key`, so the poster may send one again whenever it
cannot know whether it was stored (a reset, a lost reply, a 503); a refused connection is retried
too (it stored nothing). Outcomes are counted and printed.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from .servers import Gunicorn, RedisServer, wait_until
from .sse_client import open_stream

CONVERSATIONS = 5
CLIENTS_PER_CONVERSATION = 10  # 50 streams in all
WORKERS = 2
RETRY_MS = "300"
# Far above how long ending the streams takes, so "ended promptly" cannot be gunicorn's kill at
# the graceful timeout.
GRACEFUL_TIMEOUT = 30
PROMPT_SECONDS = 8.0  # each stream open at the signal ends within this (the hub's exit path: ~1-3 s)
POST_PAUSE = 0.1  # seconds between two posts of one poster (5 posters: about 40 posts/s)
SSE = "/api/sse/conversations/{}/events"


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def children(pid: int) -> list[int]:
    """The pids of a process's children that are still running."""
    try:
        return [c.pid for c in psutil.Process(pid).children() if not gone(c.pid)]
    except psutil.NoSuchProcess:
        return []


def read_pid(path: Path) -> int | None:
    """The pid in a gunicorn pidfile (None while it is missing or being written)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def request(port: int, method: str, path: str, key: str, body: object | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, object]:
    """One request on a new connection: (status, JSON body). Network errors are raised."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Authorization": f"Bearer {key}", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=all_headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def listing(port: int, key: str, cid: str) -> list[dict]:
    """Every stored event of a conversation, through the REST API."""
    events: list[dict] = []
    while True:
        status, body = request(port, "GET", f"/api/conversations/{cid}/events?start_id={len(events)}&limit=1000", key)
        assert status == 200, body
        events += body["events"]
        if not body["has_more"]:
            return events


class Follower(threading.Thread):
    """One EventSource-like client: follows a conversation, reconnecting with `Last-Event-ID`.

    A non-200 answer to a stream request ends it for good (as a browser's EventSource fails);
    a refused or reset connection is retried after `retry` ms.
    """

    def __init__(self, port: int, cid: str, key: str, deadline: float):
        super().__init__(daemon=True)
        self.port, self.path, self.key, self.deadline = port, SSE.format(cid), key, deadline
        self.target: int | None = None  # events to collect, known once the posters are done
        self.ids: list[int] = []
        self.last_id: str | None = None
        self.opened = 0
        self.network_errors = 0
        self.ends: list[float] = []  # when each 200 stream was ended by the server
        self.failure: tuple[int, bytes] | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def done(self) -> bool:
        """Whether every expected event is in (or the test gave up)."""
        return self.stop.is_set() or (self.target is not None and len(self.ids) >= self.target)

    def run(self) -> None:
        retry = 3.0
        try:
            while not self.done() and time.monotonic() < self.deadline:
                headers = {"Authorization": f"Bearer {self.key}", "Cache-Control": "no-cache"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    stream = open_stream(self.port, self.path, headers, timeout=10)
                except OSError:  # refused while no server listens, or reset: try again
                    self.network_errors += 1
                    self.stop.wait(retry)
                    continue
                if stream.status != 200:
                    self.failure = (stream.status, stream.body)
                    return
                self.opened += 1
                try:
                    while not self.done():
                        # Short reads so that `done` is checked while the stream is quiet.
                        for ev in stream.events(timeout=0.5):
                            if ev.id is not None:
                                self.last_id = ev.id
                                if ev.event == "message" and ev.data:
                                    self.ids.append(int(ev.id))
                            if self.done():
                                break
                        if stream.ended(0):
                            self.ends.append(time.monotonic())
                            break
                finally:
                    stream.close()
                retry = (stream.retry or 3000) / 1000
                self.stop.wait(retry)
        except BaseException as err:  # reported by the test
            self.error = err


class Poster(threading.Thread):
    """Posts to one conversation steadily until told to stop; each post is retried until it gets a 200."""

    def __init__(self, port: int, cid: str, key: str):
        super().__init__(daemon=True)
        self.port, self.cid, self.key = port, cid, key
        self.outcomes: Counter = Counter()
        self.posted: list[int] = []  # the event id each post got, in posting order
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def post(self, n: int) -> int:
        """Post message n until it is answered 200; its event id."""
        headers = {"Idempotency-Key": f"post-{self.cid}-{n}"}
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"post {n} got no 200 in 60 s: {self.outcomes}"
            try:
                status, body = request(self.port, "POST", f"/api/conversations/{self.cid}/events", self.key,
                                       {"type": "user_message", "content": f"m{n}"}, headers)
            except ConnectionRefusedError:  # nothing listens: it cannot have been stored
                self.outcomes["refused, retried"] += 1
            except (OSError, http.client.HTTPException):  # may have been stored: same key again
                self.outcomes["lost reply, retried with its key"] += 1
            else:
                if status == 200:
                    self.outcomes["200"] += 1
                    return body["event_id"]
                assert status == 503, (status, body)
                self.outcomes["503, retried with its key"] += 1
            self.halt.wait(0.1)

    def run(self) -> None:
        try:
            n = 0
            while not self.halt.is_set():
                self.posted.append(self.post(n))
                n += 1
                self.halt.wait(POST_PAUSE)
        except BaseException as err:  # reported by the test
            self.error = err


@dataclass
class Disruption:
    """What a scenario did: when the streams were told to end, and the gunicorn servers to clean up."""

    signalled: float
    quiet_since: float | None = None  # streams must not end between this and `signalled` (USR2)
    # The listening socket stayed open throughout (HUP, USR2): every post must be answered 200 the
    # first time, none refused, reset or cut off.
    socket_kept: bool = True
    notes: list[str] = field(default_factory=list)


class Scenario:
    """Servers, keys and conversations of one test; everything started is stopped at the end."""

    def __init__(self, redis_server: RedisServer, tmp_path: Path, make_key: Callable[[str], str]):
        self.redis_url = redis_server.url
        self.tmp_path = tmp_path
        self.pidfile = tmp_path / "gunicorn.pid"
        self.key = make_key("alice")
        self.servers: list[Gunicorn] = []
        self.masters: list[int] = []  # masters re-executed by USR2 (not Popen children of ours)

    def start(self, port: int | None = None) -> Gunicorn:
        """A gunicorn with 2 workers (on `port` if given: a restart on the same address)."""
        server = Gunicorn(self.redis_url, workers=WORKERS, SSE_RETRY_MS=RETRY_MS, SSE_MAX_STREAMS_PER_USER="0",
                          GRACEFUL_TIMEOUT=str(GRACEFUL_TIMEOUT), PIDFILE=str(self.pidfile))
        if port is not None:
            server.port = port
            server.env["BIND"] = f"127.0.0.1:{port}"
        self.servers.append(server)
        return server.start(self.tmp_path / f"gunicorn-{len(self.servers)}.log")

    def log(self) -> str:
        """Every server's log."""
        return "".join(s.log() for s in self.servers)

    def cleanup(self) -> None:
        """TERM the masters we did not start ourselves, then stop (and kill the group of) every server."""
        for pid in self.masters:
            if not gone(pid):
                os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: all(gone(p) for p in self.masters), 20, what="re-executed masters to exit")
        except TimeoutError:
            pass
        for server in self.servers:
            pgid = server.proc.pid if server.proc is not None else None
            server.stop()  # also SIGKILLs its process group, where a USR2 master and its workers are
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def follow_through(scenario: Scenario, disrupt: Callable[[Gunicorn], Disruption]) -> None:
    """50 clients follow 5 conversations under steady posts while `disrupt` stops or reloads the server."""
    server = scenario.start()
    port, key = server.port, scenario.key
    cids = []
    for _ in range(CONVERSATIONS):
        status, body = request(port, "POST", "/api/conversations", key, {})
        assert status == 200, body
        cids.append(body["conversation_id"])
    deadline = time.monotonic() + 240
    clients = [Follower(port, cid, key, deadline) for cid in cids for _ in range(CLIENTS_PER_CONVERSATION)]
    posters = [Poster(port, cid, key) for cid in cids]
    try:
        for client in clients:
            client.start()
        wait_until(lambda: all(c.opened or c.failure or c.error for c in clients), 60, what="50 streams open")
        for poster in posters:
            poster.start()
        wait_until(lambda: all(len(c.ids) >= 3 or c.failure or c.error for c in clients), 60,
                   what="first events on every stream")
        assert not any(c.failure or c.error for c in clients), [(c.failure, c.error) for c in clients]

        disruption = disrupt(server)
        served_again = time.monotonic()

        # Posts go on after the server is back, so every client must catch up on both sides of it.
        marks = [len(p.posted) for p in posters]
        wait_until(lambda: all(len(p.posted) >= m + 10 or p.error for p, m in zip(posters, marks)), 60,
                   what="10 more posts per conversation")
        for poster in posters:
            poster.halt.set()
        for poster in posters:
            poster.join(70)
        assert not any(p.is_alive() for p in posters), "posters finished"
        assert not any(p.error for p in posters), [repr(p.error) for p in posters if p.error]

        stored = {cid: listing(port, key, cid) for cid in cids}
        for client, cid in zip(clients, [c for c in cids for _ in range(CLIENTS_PER_CONVERSATION)]):
            client.target = len(stored[cid])
        wait_until(lambda: all(c.done() or c.failure or c.error for c in clients), 60,
                   what="every client to have every event")
    finally:
        for thread in (*clients, *posters):
            if isinstance(thread, Follower):
                thread.stop.set()
            else:
                thread.halt.set()
        for thread in (*clients, *posters):
            if thread.ident is not None:
                thread.join(20)
    assert not any(t.is_alive() for t in (*clients, *posters)), "every client thread ended"

    outcomes = sum((p.outcomes for p in posters), Counter())
    print(f"\nposts: {dict(outcomes)}; stream opens: {sum(c.opened for c in clients)}, "
          f"refused/reset stream connects: {sum(c.network_errors for c in clients)}; {'; '.join(disruption.notes)}")
    for poster in posters:
        events = stored[poster.cid]
        assert [e["id"] for e in events] == list(range(len(events))), "ids consecutive from 0"
        assert poster.posted == list(range(len(events))), "every post stored exactly once, in order"
        assert [e["content"] for e in events] == [f"m{n}" for n in range(len(events))], "one event per post"
    assert outcomes["200"] == sum(len(p.posted) for p in posters), "every post answered 200 once"
    if disruption.socket_kept:
        assert set(outcomes) == {"200"}, f"no post in flight lost while the socket stayed open: {outcomes}"
    for client, cid in zip(clients, [c for c in cids for _ in range(CLIENTS_PER_CONVERSATION)]):
        assert client.error is None, repr(client.error)
        assert client.failure is None, f"a stream request was answered {client.failure}: an EventSource closes"
        assert client.ids == [e["id"] for e in stored[cid]], "every event exactly once, in order, as listed"
        assert client.opened >= 2, "the client reconnected"
        ended = [t for t in client.ends if t >= disruption.signalled]
        assert ended and ended[0] <= disruption.signalled + PROMPT_SECONDS, (
            f"the stream ended {ended[0] - disruption.signalled if ended else None} s after the signal "
            f"(within {PROMPT_SECONDS} s expected)")
        if disruption.quiet_since is not None:
            assert not [t for t in client.ends if disruption.quiet_since <= t < disruption.signalled], (
                "USR2 alone ends no stream")
        assert served_again >= disruption.signalled
    assert "Traceback" not in scenario.log()


@pytest.fixture()
def scenario(redis_server: RedisServer, redis_client, tmp_path: Path, make_key):
    """A Scenario whose processes are all gone after the test."""
    scene = Scenario(redis_server, tmp_path, make_key)
    try:
        yield scene
    finally:
        scene.cleanup()


def test_hup_reload_replaces_workers_and_loses_nothing(scenario: Scenario):
    def hup(server: Gunicorn) -> Disruption:
        old = set(server.worker_pids())
        signalled = time.monotonic()
        server.signal(signal.SIGHUP)
        wait_until(lambda: all(gone(p) for p in old), 20, what="the old workers to exit")
        exited = time.monotonic() - signalled
        wait_until(lambda: len(set(server.worker_pids()) - old) == WORKERS and server.healthy(), 30,
                   what="the new workers")
        assert server.proc.poll() is None, "the master lives on"
        return Disruption(signalled, notes=[f"HUP: old workers gone after {exited:.1f} s"])

    follow_through(scenario, hup)


def test_term_stops_gracefully_and_a_restart_loses_nothing(scenario: Scenario):
    def term_and_restart(server: Gunicorn) -> Disruption:
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.proc.wait(GRACEFUL_TIMEOUT + 10)
        exited = time.monotonic() - signalled
        assert code == 0, f"gunicorn exited with {code}"
        # Not GRACEFUL_TIMEOUT: the streams ended at once, so the workers had nothing left to wait for.
        assert exited < PROMPT_SECONDS + 2, f"the master took {exited:.1f} s to stop"
        scenario.start(port=server.port)  # what systemd's Restart= or a deploy does
        return Disruption(signalled, socket_kept=False, notes=[f"TERM: master exited after {exited:.1f} s"])

    follow_through(scenario, term_and_restart)


def test_usr2_binary_upgrade_then_term_of_the_old_master_loses_nothing(scenario: Scenario):
    def usr2_then_term(server: Gunicorn) -> Disruption:
        old_master = server.proc.pid
        old_workers = set(server.worker_pids())
        assert read_pid(scenario.pidfile) == old_master
        usr2 = time.monotonic()
        server.signal(signal.SIGUSR2)
        # gunicorn 27: the new master (a child of the old one, re-executed with GUNICORN_FD naming
        # the inherited listening sockets) writes its pid to `<pidfile>.2` (not `.oldbin`).
        new_pidfile = Path(f"{scenario.pidfile}.2")
        new_master = wait_until(lambda: read_pid(new_pidfile), 30, what="the new master's pidfile")
        scenario.masters.append(new_master)
        assert new_master in children(old_master)
        wait_until(lambda: len(children(new_master)) == WORKERS, 30, what="the new master's workers")
        new_workers = set(children(new_master))

        def new_workers_answer() -> bool:
            # Both sets of workers accept on the one socket now; wait until a new one has answered.
            status, body = request(server.port, "GET", "/healthz", scenario.key)
            return status == 200 and body.get("worker_pid") in new_workers

        wait_until(new_workers_answer, 30, interval=0.05, what="a new worker to answer")
        signalled = time.monotonic()
        os.kill(old_master, signal.SIGTERM)
        code = server.proc.wait(GRACEFUL_TIMEOUT + 10)
        exited = time.monotonic() - signalled
        assert code == 0, f"the old master exited with {code}"
        assert exited < PROMPT_SECONDS + 2, f"the old master took {exited:.1f} s to stop"
        assert all(gone(p) for p in old_workers)
        # Promoted: the new master renames `<pidfile>.2` to `<pidfile>` once its parent is gone.
        wait_until(lambda: read_pid(scenario.pidfile) == new_master and not new_pidfile.exists(), 10,
                   what="the new master's promotion")
        assert not gone(new_master) and set(children(new_master)) == new_workers
        return Disruption(signalled, quiet_since=usr2, notes=[
            f"USR2: new master up, TERM to the old one {signalled - usr2:.1f} s later; it exited after {exited:.1f} s"])

    follow_through(scenario, usr2_then_term)
