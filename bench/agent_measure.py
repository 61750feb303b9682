"""The bench's measurements: one row (a scenario with N workers on a fresh Redis), its CPU and Redis counters."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from agent_procs import MAIN, Hurry, Live, RedisServer, Workers, _s, say, tail
from agent_report import RowResults, delta

OWNER = "bench-agents"
NO_ANSWER_S = 10.0  # no agent event this long after the first post: the runtime does not answer


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


def script_commands() -> set[str]:
    """Every command the runtime's and the store's Lua scripts call (counted by commandstats too)."""
    text = "".join(p.read_text() for p in (MAIN / "app/agent/scripts").glob("*.lua"))
    text += (MAIN / "app/lua.py").read_text()
    names = {m.lower() for m in re.findall(r"redis\.call\(\s*'([A-Za-z]+)'", text)}
    if re.search(r"redis\.call\(\s*publish\b", text):
        names |= {"publish", "spublish"}
    return names


# ----------------------------------------------------------------------------- one row


class Row(RowResults):
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
