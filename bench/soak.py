"""Soak: a bounded mixed load on the real service, sampling memory, fds, greenlets and Redis over time.

    python3 bench/soak.py --minutes 30          # the reported run
    python3 bench/soak.py --minutes 2           # a short one, to check the harness
    python3 bench/soak.py --minutes 30 --streams 1000 --conversations 200 --users 20 \
        --posts-per-second 20 --workers 2 --agent-workers 1 --sample-seconds 10

Starts what an operator runs (bench/run.py's `Server`: `gunicorn -c gunicorn.conf.py wsgi:app`,
gevent workers, WEB_CONCURRENCY=--workers, the per-user stream cap at its default; a fresh Redis of
its own) and the agent runtime (bench/agent_procs.py `Workers`: `python -m app.agent run --agent
echo`). The per-key rate limits are off (POST_RATE_LIMIT=0, STREAM_RATE_LIMIT=0); the streams are
spread over --users keys so no user reaches SSE_MAX_STREAMS_PER_USER (100). Then, in this one
asyncio process (bench/soak_clients.py): --streams SSE clients over --conversations, each closed
after a random lifetime and reopened with Last-Event-ID; user_message posts at a steady rate that
the echo agent answers. Every --sample-seconds it prints a line and records the RSS, fds and CPU
of the gunicorn master and workers, the agent workers and Redis, the greenlet gauge from /metrics,
Redis connections and used_memory, streams open, deliveries/s, post latency and losses so far.
At the end (posting stopped, a drain) every client must hold exactly the ids 0..last of its
conversation and every acknowledged post must be stored and answered once.
Writes bench/results/soak-<date>.json and docs/soak.png (logs: bench/results/logs/soak-<date>/).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import run as bench_run
from run import MAIN, MAIN_VENV, RESULTS, Server, machine_info, say

if __name__ == "__main__":
    bench_run.__file__ = __file__  # ensure_venv re-executes the script named here, inside bench/.venv
    bench_run.ensure_venv()

import redis  # noqa: E402  (bench/.venv)
from agent_procs import Workers  # noqa: E402
from loadgen import Http, new_loop  # noqa: E402
from soak_clients import Phase, Poster, SoakClient, Tally, UserClients, check, listing  # noqa: E402
from soak_report import Sampler, plot, summarize  # noqa: E402

AGENT_SHARDS = 8  # AGENT_SHARDS' default (app/config.py): the workers must read every shard
AGENT_CONCURRENCY = 32  # AGENT_CONCURRENCY's default


class SoakServer(Server):
    """bench/run.py's `ours`, but as an operator runs it: WEB_CONCURRENCY workers, the default stream cap."""

    def __init__(self, logdir: Path, workers: int):
        super().__init__("ours", logdir)
        self.workers = workers

    def command(self) -> tuple[list[str], dict, Path]:
        cmd, env, cwd = super().command()
        env.pop("SSE_MAX_STREAMS_PER_USER", None)  # its default, 100
        env.update(WEB_CONCURRENCY=str(self.workers), POST_RATE_LIMIT="0", STREAM_RATE_LIMIT="0",
                   GREENLET_COUNT_SECONDS="10")  # every worker's gauge fresh, whichever one a sample reaches
        return cmd, env, cwd


def create_keys(redis_url: str, users: list[str]) -> list[str]:
    """One key per user, made by the app's own Store in one process (what `flask keys create` calls)."""
    code = ("import sys\nfrom wsgi import app\nwith app.app_context():\n"
            "    store = app.extensions['store']\n"
            "    for user in sys.argv[1:]:\n        print(store.create_api_key(user)[1])\n")
    out = subprocess.run([str(MAIN_VENV / "bin/python"), "-c", code, *users], cwd=MAIN, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "REDIS_URL": redis_url})
    keys = out.stdout.split()
    if out.returncode != 0 or len(keys) != len(users):
        raise RuntimeError(f"creating keys failed (rc {out.returncode}): {out.stderr[-800:]}")
    return keys


async def create_conversations(host: str, port: int, keys: list[str], n: int) -> list[tuple[str, int]]:
    """The conversations (n), conversation j owned by user j % len(keys)."""
    https = [Http(host, port, k) for k in keys]
    convs = []
    for j in range(n):
        user = j % len(keys)
        status, data = await https[user].request("POST", "/api/conversations", b"{}")
        if status != 200:
            raise RuntimeError(f"creating a conversation: HTTP {status} {data[:200]!r}")
        convs.append((json.loads(data)["conversation_id"], user))
    for h in https:
        h.close()
    return convs


def progress(s: dict) -> str:
    """The line printed at every sample."""
    def mb(name: str) -> str:
        return "/".join(f"{p['rss_mb']:.0f}" for p in s["procs"] if p["role"] == name) or "-"
    fds = "/".join(str(p["fds"]) for p in s["procs"] if p["role"] == "gunicorn worker")
    gl = "absent" if s["greenlets"] is None else s["greenlets"]
    pl = s["post_latency_ms"]
    return (f"{s['elapsed_s']:5.0f}s open {s['streams_open']} deliv {s['delivered_per_s']:.0f}/s "
            f"posts {s['posts_per_s']:.1f}/s p50 {pl.get('p50', '-')} p99 {pl.get('p99', '-')} ms | RSS MB master "
            f"{mb('gunicorn master')} workers {mb('gunicorn worker')} agents {mb('agent worker')} redis "
            f"{mb('redis')} | fds {fds} | greenlets {gl} | redis conns {s['redis_clients']} mem "
            f"{s['redis_used_memory_mb']:.1f}MB | lost {s['client_gaps']} dup {s['client_dup']} | cpu% loadgen "
            f"{s['cpu_pct']['loadgen']:.0f} server {s['cpu_pct']['server']:.0f} agents {s['cpu_pct']['agents']:.0f} "
            f"machine {s['cpu_pct']['machine']:.0f}/200 load {s['loadavg'][0]:.1f}")


async def soak(a, srv: Server, workers: Workers, keys: list[str]) -> dict:
    """The timed load, its samples and the final checks."""
    host, port = "127.0.0.1", srv.port
    loop = asyncio.get_running_loop()
    convs = await create_conversations(host, port, keys, a.conversations)
    tally = Tally()
    users = [UserClients(f"{host}:{port}", k, tally) for k in keys]
    clients = [SoakClient(users[convs[i % len(convs)][1]], i, convs[i % len(convs)][0], i % len(convs))
               for i in range(a.streams)]
    rng = random.Random(a.seed)
    stop = Phase()
    poster = Poster(host, port, keys, convs, a.posts_per_second)
    sampler = Sampler(srv, workers, f"http://{host}:{port}/metrics")
    life = (a.lifetime_min, a.lifetime_max)
    samples: list[dict] = []
    t0 = time.monotonic()
    say(f"{a.streams} streams over {a.conversations} conversations ({len(keys)} users), "
        f"{a.posts_per_second:g} posts/s, lifetimes {life[0]:g}-{life[1]:g} s, for {a.minutes:g} min")

    async def take(phase: str) -> dict:
        s = await loop.run_in_executor(None, sampler.take)
        s.update(phase=phase, elapsed_s=round(time.monotonic() - t0, 1), streams_open=tally.open,
                 delivered=tally.delivered, posts_sent=poster.sent, posts_acked=poster.ok,
                 post_errors=sum(poster.errors.values()), client_dup=tally.dup, client_gaps=tally.gaps,
                 opened=tally.opened, server_ended=tally.server_ended, open_failures=sum(tally.reasons.values()),
                 post_latency_ms=poster.latency.take_window(), delivery_latency_ms=tally.delivery.take_window())
        prev = samples[-1] if samples else None
        dt = (s["elapsed_s"] - prev["elapsed_s"]) if prev else 0
        s["delivered_per_s"] = (s["delivered"] - prev["delivered"]) / dt if dt else 0.0
        s["posts_per_s"] = (s["posts_acked"] - prev["posts_acked"]) / dt if dt else 0.0
        samples.append(s)
        say(progress(s))
        return s

    await take("start")  # before any stream or post
    tasks = [asyncio.ensure_future(c.run(loop, host, port, life, stop, rng)) for c in clients]
    poster_task = asyncio.ensure_future(poster.run(stop))
    t_end = time.monotonic() + a.minutes * 60
    while time.monotonic() < t_end:
        await asyncio.sleep(min(a.sample_seconds, max(0.0, t_end - time.monotonic())))
        await take("load")
    stop.deadline = time.monotonic() + 60
    stop.set()
    await poster_task
    await poster.drain(60)
    say(f"posting stopped: {poster.sent} sent, {poster.ok} acknowledged, errors {dict(poster.errors)}; draining")
    drained = await drain(host, port, keys, convs, clients, a.drain_seconds)
    await asyncio.wait(tasks, timeout=5)
    final = await take("drained")
    checks = await final_checks(host, port, keys, convs, clients, poster)
    for c in clients:
        c.s.close()
    return {"samples": samples, "drained": drained, "checks": checks, "final_sample": final,
            "posts": {"sent": poster.sent, "acked": poster.ok, "errors": dict(poster.errors),
                      "late_over_1s": poster.behind, "latency_ms": poster.latency.summary()},
            "delivery_latency_ms": tally.delivery.summary(),
            "streams": {"opened": tally.opened, "server_ended": tally.server_ended,
                        "open_failures": dict(tally.reasons), "delivered": tally.delivered,
                        "dup_seen_live": tally.dup, "out_of_order_or_gap_live": tally.gaps}}


async def drain(host, port, keys, convs, clients, seconds: float) -> dict:
    """Until every conversation's agent is idle and every client holds its conversation's last id (bounded)."""
    https = [Http(host, port, k) for k in keys]
    t0 = time.monotonic()
    by_conv: dict[int, list[SoakClient]] = {}
    for c in clients:
        by_conv.setdefault(c.s.conv, []).append(c)
    lasts: list[int] = []
    while time.monotonic() - t0 < seconds:
        lasts, busy = [], 0
        for cid, user in convs:
            status, data = await https[user].request("GET", f"/api/conversations/{cid}")
            conv = json.loads(data) if status == 200 else {}
            lasts.append(conv.get("last_event_id", -2))
            busy += conv.get("agent_state") != "awaiting_user_input"
        behind = sum(1 for j, cs in by_conv.items() for c in cs if c.s.maxid != lasts[j] or not c.is_open)
        if not busy and not behind:
            break
        await asyncio.sleep(2)
    for h in https:
        h.close()
    return {"seconds": round(time.monotonic() - t0, 1), "agents_busy": busy, "clients_behind": behind}


async def final_checks(host, port, keys, convs, clients, poster: Poster) -> dict:
    """Each conversation's listing against its acknowledged posts and against every client's ids."""
    https = [Http(host, port, k) for k in keys]
    by_conv: dict[int, list[SoakClient]] = {}
    for c in clients:
        by_conv.setdefault(c.s.conv, []).append(c)
    total: dict = {"incomplete": []}
    events = 0
    for j, (cid, user) in enumerate(convs):
        evs = await listing(https[user], cid)
        events += len(evs)
        for k, v in check(evs, poster.acked[j], by_conv.get(j, [])).items():
            if k == "incomplete":
                total[k] += [{"conversation": j, **x} for x in v][:20 - len(total[k])]
            elif k != "last_id":
                total[k] = total.get(k, 0) + int(v)
    for h in https:
        h.close()
    total["events_stored"] = events
    total["acked_posts_checked"] = sum(len(v) for v in poster.acked.values())
    return total


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="load duration (then a bounded drain)")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--users", type=int, default=20, help="users (one key each) the conversations are spread over")
    ap.add_argument("--posts-per-second", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    ap.add_argument("--agent-workers", type=int, default=1, help="agent worker processes (echo agent)")
    ap.add_argument("--lifetime-min", type=float, default=5.0, help="shortest stream lifetime before reopening, s")
    ap.add_argument("--lifetime-max", type=float, default=120.0, help="longest stream lifetime, s")
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--drain-seconds", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", help="results JSON (default bench/results/soak-<date>.json)")
    ap.add_argument("--plot", default=str(MAIN / "docs" / "soak.png"))
    ap.add_argument("--report-from", metavar="JSON", help="no run: redo the summary and plot of a saved result")
    return ap.parse_args(argv)


def _stop_on_signal(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # runs the finally blocks: server, agents, Redis


def main() -> None:
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    a = parse_args()
    if a.report_from:
        data = json.loads(Path(a.report_from).read_text())
        data["summary"] = summarize(data)
        Path(a.report_from).write_text(json.dumps(data, indent=1))
        plot(data, Path(a.plot))
        say(f"summary rewritten in {a.report_from}; plot: {a.plot}")
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    logdir = RESULTS / "logs" / f"soak-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else RESULTS / f"soak-{stamp}.json"
    data: dict = {"config": vars(a), "started_utc": stamp, "machine": machine_info(), "logs": str(logdir)}
    srv = SoakServer(logdir, a.workers)
    workers = None
    try:
        srv.start("soak")
        keys = create_keys(srv.redis.url, [f"soak{u}" for u in range(a.users)])
        workers = Workers(a.agent_workers, srv.redis.url, AGENT_CONCURRENCY, logdir, "soak", {})
        workers.wait_ready(redis.Redis(port=srv.redis.port), AGENT_SHARDS)
        say(f"server :{srv.port} (pid {srv.p.pid}, {a.workers} workers), {a.agent_workers} agent worker(s), "
            f"redis :{srv.redis.port}; log dir {logdir}")
        loop = new_loop()
        budget = a.minutes * 60 + a.drain_seconds + 300
        data.update(loop.run_until_complete(asyncio.wait_for(soak(a, srv, workers, keys), budget)))
        data["agent_errors"] = workers.errors()
        data["server_log_errors"] = sum(1 for ln in srv.logpath.read_text(errors="replace").splitlines()
                                        if " ERROR " in ln or ln.startswith("Traceback"))
    finally:
        if workers is not None:
            workers.stop()
        srv.stop()
    data["summary"] = summarize(data)
    out.write_text(json.dumps(data, indent=1))
    say(f"results: {out}")
    plot(data, Path(a.plot))
    say(f"plot: {a.plot}")
    print(json.dumps(data["summary"], indent=1))
    sys.exit(0 if data["summary"]["ok"] else 1)


if __name__ == "__main__":
    main()
