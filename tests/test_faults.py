"""Faults with real processes (issue 11): Redis restarted or unreachable, a gunicorn worker or an agent worker killed.

Each test holds its clients to API.md: every acknowledged post stored once, every client holding
every event once and in order across its reconnects, 503 with Retry-After (never a 500) while
Redis is away. The load-shaped faults (a stalled reader, connections dropped by the thousand) are
in test_faults_load.py.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import redis

from .agent_workers import AgentWorker
from .conftest import Api, bearer
from .fault_clients import SSE, Follower, Poster, check_followers, open_streams, own_key, worker_pid
from .faultproxy import DownRedis
from .servers import RedisServer, wait_until
from .sse_client import open_stream
from .test_stream_faults import named_connections


def stored(api: Api, cid: str) -> list[dict]:
    """Every stored event of a conversation (REST listing)."""
    out: list[dict] = []
    while True:
        status, page, _ = api.call("GET", f"/api/conversations/{cid}/events?start_id={len(out)}&limit=1000")
        assert status == 200, page
        out += page["events"]
        if not page["has_more"]:
            return out


@pytest.mark.timeout(120)
def test_redis_restart_with_aof_loses_no_acknowledged_post_and_each_client_has_every_event_once(start_server,
                                                                                                tmp_path):
    own = RedisServer(tmp_path / "redis-aof", appendonly=True).start()  # appendfsync always (servers.py)
    try:
        # No stream cap: leases a restart leaves behind would only make the 50 clients wait (429s).
        server = start_server(redis_url=own.url, REDIS_TIMEOUT_SECONDS="1", SSE_MAX_STREAMS_PER_USER="0")
        key = own_key(own.url)
        api = Api(server.base, key)
        cids = [api.create() for _ in range(5)]
        per_conversation = 30
        followers = [Follower(server.port, cids[i % 5], key, per_conversation) for i in range(50)]
        for f in followers:
            f.start()
        wait_until(lambda: open_streams(server.base) >= 50, 30, what="50 streams open")
        posters = [Poster(api, cid, per_conversation, 0.05) for cid in cids]
        for p in posters:
            p.start()
        wait_until(lambda: all(len(p.acked) >= 8 for p in posters), 30, what="posts flowing")

        own.kill()  # SIGKILL: only what the append-only file holds comes back
        wait_until(lambda: any(p.failures for p in posters), 10, what="a post meeting the outage")
        own.start()  # same port, same directory: the AOF is replayed

        for p in posters:
            p.join(90)
        assert not any(p.is_alive() for p in posters)
        for p in posters:
            assert p.error is None, repr(p.error)
            # One post at a time per conversation: post n is event n, acknowledged once whatever the retries.
            assert p.acked == {n: n for n in range(per_conversation)}
            assert {status for status, _ in p.failures} <= {0, 503}, "never a 500, or anything but 503"
            assert all(h.get("Retry-After") for status, h in p.failures if status == 503)
        check_followers(followers, {cid: per_conversation for cid in cids})
        for p in posters:
            events = stored(api, p.cid)
            assert [e["content"] for e in events] == [p.content(n) for n in range(per_conversation)]
        assert any(p.failures for p in posters)
        print(f"restart: {sum(len(p.failures) for p in posters)} failed tries, "
              f"{sum(f.opens - 1 for f in followers)} reconnects")
        assert "Traceback" not in server.log()
    finally:
        own.stop()


def _readyz(api: Api) -> tuple[int, dict, dict]:
    return api.call("GET", "/readyz")


@pytest.mark.timeout(90)
def test_redis_unreachable_for_10s_gives_503s_and_the_hub_reconnects_with_backoff_and_streams_resume(
        start_server, tmp_path):
    own = RedisServer(tmp_path / "redis-down", appendonly=True).start()
    down: DownRedis | None = None
    try:
        server = start_server(redis_url=own.url, REDIS_TIMEOUT_SECONDS="1")
        key = own_key(own.url)
        api = Api(server.base, key)
        cid = api.create()
        streams = [open_stream(server.port, SSE.format(cid), bearer(key)) for _ in range(3)]
        assert all(s.take(1)[0].event == "connection" for s in streams)
        api.post(cid, type="user_message", content="before")
        assert all([e.id for e in s.take(1)] == ["0"] for s in streams)
        pid = worker_pid(server.base)
        probe = redis.Redis(port=own.port)
        wait_until(lambda: {"hub-pubsub", "hub-control"} <= set(named_connections(probe, pid)), 10,
                   what="the hub's connections")
        probe.close()

        own.stop()
        down = DownRedis(own.port).start()  # Redis's port accepts and drops: each attempt is seen
        started = time.monotonic()
        posts = readies = opens = 0
        while time.monotonic() - started < 10:
            status, body, headers = api.call("POST", f"/api/conversations/{cid}/events",
                                             {"type": "user_message", "content": "while down"},
                                             headers={"Idempotency-Key": f"down-{posts}"})
            assert (status, body["error"]) == (503, "redis_unavailable"), body
            assert headers["Retry-After"] == "1" and headers["Content-Type"] == "application/json"
            posts += 1
            status, body, headers = _readyz(api)
            assert status == 503 and body["status"] == "error" and body["error"] == "redis_unavailable", body
            assert headers["Retry-After"] == "1"
            readies += 1
            if opens < 3:  # a new stream is refused the same way (the open ones wait)
                refused = open_stream(server.port, SSE.format(cid), bearer(key))
                assert refused.status == 503 and refused.headers["retry-after"] == "1", refused.body
                opens += 1
            time.sleep(0.5)
        down.stop()
        own.start()  # the same port; the app is not told

        # The hub's pub/sub reconnect backed off: from 50 ms doubling to a 2 s cap, not a hot loop.
        attempts = down.times("hub-pubsub")
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert 3 <= len(attempts) <= 20, (len(attempts), gaps)
        assert all(gap >= 0.04 for gap in gaps), gaps
        assert max(gaps[-3:]) >= 1.0 and min(gaps[-3:]) >= 0.5, gaps  # at (near) the cap by the end
        # Every connection this worker tried in 10 s, hub and request pool together: bounded by the
        # requests made (each tried at most twice) and the hub's once-a-second check.
        roles = Counter(role for _t, role in down.attempts)
        print(f"outage: {posts} posts, {readies} readyz, {opens} opens; attempts {dict(roles)}; "
              f"pub/sub gaps {[round(g, 2) for g in gaps]}")
        assert roles["hub-control"] <= 25 and roles["?"] == 0, roles
        assert roles["pool"] <= 2 * (posts + readies + opens) + 5, roles

        # The open streams were never ended: they get what is posted once Redis is back, by themselves.
        wait_until(lambda: _readyz(api)[0] == 200, 20, what="/readyz 200 again")
        for i in range(3):
            api.post(cid, type="user_message", content=f"after {i}")
        for s in streams:
            assert [e.json()["content"] for e in s.take(3, timeout=15)] == ["after 0", "after 1", "after 2"]
            assert not s._eof
        assert [e["content"] for e in stored(api, cid)] == ["before", "after 0", "after 1", "after 2"]
        assert "Traceback" not in server.log()
    finally:
        if down is not None:
            down.stop()
        own.stop()


def _established(pid: int, port: int) -> int:
    """TCP connections the process `pid` holds on the local `port` (its clients)."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


@pytest.mark.timeout(90)
def test_a_sigkilled_gunicorn_worker_s_clients_resume_elsewhere_losing_and_repeating_nothing(start_server, make_key):
    server = start_server(workers=2)
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    total = 60
    followers = [Follower(server.port, cid, api.key, total) for _ in range(16)]
    for f in followers:
        f.start()
    wait_until(lambda: open_streams(server.base) >= 16, 20, what="16 streams open")
    poster = Poster(api, cid, total, 0.05)
    poster.start()
    wait_until(lambda: len(poster.acked) >= 10 and all(f.ids for f in followers), 20, what="events flowing")
    assert len(poster.acked) < total, "the posts ended before the kill"
    # The worker holding the most streams (the kernel spreads connections unevenly).
    victim = max(server.worker_pids(), key=lambda pid: _established(pid, server.port))
    held = _established(victim, server.port)
    assert held >= 1
    os.kill(victim, signal.SIGKILL)
    poster.join(60)
    assert not poster.is_alive() and poster.error is None, repr(poster.error)
    assert poster.acked == {n: n for n in range(total)}
    check_followers(followers, {cid: total})
    assert sum(1 for f in followers if f.opens > 1) >= held, "the killed worker's clients reconnected"
    wait_until(lambda: len(pids := server.worker_pids()) == 2 and victim not in pids, 30, what="a replacement worker")
    assert [e["id"] for e in stored(api, cid)] == list(range(total))


@pytest.mark.timeout(90)
def test_an_agent_worker_sigkilled_mid_run_answers_once_over_http_on_an_open_stream(start_server, make_key,
                                                                                    redis_server, tmp_path: Path):
    notes = tmp_path / "agent-notes.log"
    workers = [AgentWorker(redis_server.url, tmp_path / f"agent-{n}.log", TEST_AGENT_LOG=str(notes)) for n in (0, 1)]
    try:
        workers[0].start()
        server = start_server()
        api = Api(server.base, make_key("alice"))
        cid = api.create()
        stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
        assert stream.take(1)[0].event == "connection"
        asked = api.post(cid, type="user_message", content="steps 6 0.3")
        wait_until(lambda: notes.exists() and "step2" in notes.read_text(), 15, what="two steps done")
        workers[0].signal(signal.SIGKILL)
        workers[0].proc.wait(5)
        workers[1].start()  # takes the run over once its entry is idle (AGENT_CLAIM_IDLE_SECONDS=1)
        seen: list[dict] = []
        for ev in stream.events(timeout=20):
            seen.append(ev.json())
            if seen[-1].get("agent_state") == "awaiting_user_input":
                break
        assert seen[0]["id"] == asked and seen[0]["type"] == "user_message"
        run = seen[1:]
        assert [(e["type"], e.get("agent_state")) for e in run] == (
            [("agent_state_changed", "running")] + [("agent_action", None), ("observation", None)] * 6
            + [("agent_message", None), ("agent_state_changed", "awaiting_user_input")])
        assert [e["args"]["n"] for e in run if e["type"] == "agent_action"] == list(range(1, 7))
        assert {e["cause"] for e in run} == {asked}
        assert [e["id"] for e in seen] == list(range(asked, asked + len(seen)))
        # Nothing more comes (no second answer from the taker-over), and the store says the same.
        assert list(stream.events(timeout=2)) == [] and not stream._eof
        assert stored(api, cid) == seen
        assert sum(1 for line in notes.read_text().splitlines() if line.split()[2] == "start") == 2
    finally:
        for worker in workers:
            worker.stop()
