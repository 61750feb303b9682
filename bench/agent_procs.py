"""The bench's processes: its own redis-server, the agent workers and the live-channel subscriber."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MAIN = BENCH.parent
MAIN_VENV = MAIN / ".venv"
VPY = MAIN_VENV / "bin" / "python"
CHANNELS = "conv:*:live"
READY_S = 30.0  # longest a worker may take to read its work shards


def say(msg: str) -> None:
    """One progress line on stdout, stamped."""
    print(f"[agents {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Hurry(Exception):
    """Ctrl-C or TERM: stop the run, clean up (a second one: kill at once)."""


# The entry point's signal handler counts here; kill_group stops waiting at the second one.
STATE = {"interrupted": 0}


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    """A loopback port free right now."""
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
    """Bytes or anything else as str."""
    return v.decode() if isinstance(v, bytes) else str(v)


def tail(path: Path, n: int = 15) -> str:
    """The last `n` lines of a log, for error messages."""
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
