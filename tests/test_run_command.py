"""The newcomer's path: the README's run command, the key command it names, the web app it points to."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from .servers import ROOT, free_port, wait_until

AGENT_READY = re.compile(r"agent worker \S+: agent \w+")  # the worker's own line, once it reads its shards


def read(path: Path) -> str:
    """What a log file holds so far."""
    return path.read_text(errors="replace") if path.exists() else ""


def checkout_copy(target: Path) -> Path:
    """The project's files as a fresh checkout has them (tracked and new, not ignored), with this .venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")  # installed already: run.py sees its stamp and installs nothing
    return target


def left_running(pgid: int, checkout: Path) -> list[str]:
    """The processes left of a run command: its process group, and its embedded Redis (a session of its own)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    socket = str(checkout / "var" / "redis.sock")
    return [line.strip() for line in out.splitlines()
            if line.split()[1:2] == [str(pgid)] or (socket in line and "redis-server" in line)]


class RunCommand:
    """`python3 run.py` in a checkout, in a process group of its own, as a terminal would run it."""

    def __init__(self, checkout: Path, log: Path, env: dict[str, str]):
        self.checkout, self.log, self.env = checkout, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start it; the URL it says to open, once gunicorn and its agent worker are ready."""
        offset = len(read(self.log))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "run.py"], cwd=self.checkout, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        said = lambda: read(self.log)[offset:]  # noqa: E731
        wait_until(lambda: "then open http" in said() or self.proc.poll() is not None, 90, what="run.py's start")
        assert self.proc.poll() is None, said()[-3000:]
        url = re.search(r"then open (http://\S+/) in a browser", said()).group(1)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(url + "healthz", timeout=2) as answer:
                    return answer.status == 200 and AGENT_READY.search(said()) is not None
            except OSError:
                return False
        wait_until(ready, 60, what="the service and its agent worker")
        return url

    def ctrl_c(self) -> int:
        """What Ctrl-C in its terminal does (SIGINT to the whole group); run.py's exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(60)
        wait_until(lambda: not left_running(self.proc.pid, self.checkout), 30,
                   what="every process of the run command to exit")
        return code

    def kill(self) -> None:
        """Whatever is left of it, killed (after a failure)."""
        if self.proc is None:
            return
        for line in left_running(self.proc.pid, self.checkout):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def test_run_command_serves_the_web_app_where_a_new_key_holds_a_conversation(page, tmp_path):
    checkout = checkout_copy(tmp_path / "checkout")
    log = tmp_path / "run.log"
    # No REDIS_URL: the embedded Redis under the checkout's var/, as for a newcomer.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(BIND=f"127.0.0.1:{free_port()}", WEB_CONCURRENCY="1", AGENT_WORKERS="1")
    run = RunCommand(checkout, log, env)
    try:
        url = run.start()
        said = read(log)
        assert "starting embedded Redis" in said
        command = re.search(r"create an API key in another shell:\s+(.+)", said).group(1).split()
        assert command[0] == ".venv/bin/flask" and command[-2:] == ["create", "alice"], command
        made = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip().splitlines()[-1]

        page.goto(url)
        page.fill("#api-key", key)
        page.press("#api-key", "Enter")
        page.wait_for_selector("#new-message", state="visible")
        assert key not in page.content()
        page.fill("#new-message", "Hello from a newcomer")
        page.click("#new-button")
        answers = page.locator("#event-log [data-type=agent_message]")
        answers.first.wait_for(timeout=30_000)
        assert "Hello from a newcomer" in answers.first.inner_text()
        page.fill("#message", "And a second message")
        page.press("#message", "Enter")
        answers.nth(1).wait_for(timeout=30_000)
        assert "And a second message" in answers.nth(1).inner_text()
        conversation = page.url

        assert run.ctrl_c() == 0, read(log)[-3000:]
        assert "stopping embedded Redis" in read(log)
        assert "ConnectionError" not in read(log)  # Redis outlived the service: nothing lost its connection

        # Started again: the same data (append-only file), the same cookie secret, the same page.
        url = run.start()
        page.goto(conversation)
        answers.nth(1).wait_for(timeout=30_000)
        assert page.locator("#event-log [data-type=agent_message]").count() == 2
        assert page.locator("#event-log [data-type=user_message]").count() == 2
        assert page.page_errors == []
        assert run.ctrl_c() == 0, read(log)[-3000:]
    finally:
        run.kill()
