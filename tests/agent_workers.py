"""Real agent worker processes for the tests (`python -m app.agent run`), stopped after each test."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .servers import ROOT, wait_until


class AgentWorker:
    """One `python -m app.agent run` process on the tests' Redis."""

    def __init__(self, redis_url: str, log_path: Path, agent: str = "tests.agents:ScriptedAgent",
                 concurrency: int = 8, **env: str):
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "app.agent", "run", "--concurrency", str(concurrency)]
        if "AGENT" not in env:  # the setting chooses the agent when given; else the scripted one
            self.argv += ["--agent", agent]
        self.env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "AGENT_CLAIM_IDLE_SECONDS": "1",
                    **{k: str(v) for k, v in env.items()}}
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentWorker:
        """Start it and wait until it reads its work shards."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(lambda: "agent worker" in self.log() or self.proc.poll() is not None, 30, what="the agent worker")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        """What it logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        """Send it a signal."""
        os.kill(self.proc.pid, sig)

    def stop(self) -> int | None:
        """TERM, then KILL if it lingers; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code
