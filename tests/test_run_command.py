"""The newcomer's path: the README's run command, the key command it names, the web app it points to."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from .servers import ROOT, free_port, wait_until


def read(path: Path) -> str:
    """What a log file holds so far."""
    return path.read_text(errors="replace") if path.exists() else ""


def test_run_command_serves_the_web_app_where_a_new_key_holds_a_conversation(page, redis_server, redis_client,
                                                                            tmp_path):
    log = tmp_path / "run.log"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    # The tests' Redis (REDIS_URL set: run.py starts no embedded one), a port of the test's own.
    env = {**os.environ, "REDIS_URL": redis_server.url, "BIND": f"127.0.0.1:{free_port()}",
           "WEB_CONCURRENCY": "1", "AGENT_WORKERS": "1", "AGENT_WORKSPACE": str(workspace)}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: "then open http" in read(log) or proc.poll() is not None, 60, what="run.py's start")
        said = read(log)
        url = re.search(r"then open (http://\S+/) in a browser", said).group(1)
        command = re.search(r"create an API key in another shell:\s+(.+)", said).group(1).split()
        assert command[0] == ".venv/bin/flask" and command[-2:] == ["create", "alice"], command
        made = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip().splitlines()[-1]

        def answering() -> bool:
            try:
                with urllib.request.urlopen(url + "healthz", timeout=2) as answer:
                    return answer.status == 200 and "agent worker" in read(log)
            except OSError:
                return False
        wait_until(answering, 60, what="the service and its agent worker")

        page.goto(url)
        page.fill("#api-key", key)
        page.press("#api-key", "Enter")
        page.wait_for_selector("#new-message", state="visible")
        assert key not in page.content()
        page.fill("#new-message", "Hello from a newcomer")
        page.click("#new-button")
        log_box = page.locator("#event-log")
        page.wait_for_function("() => document.querySelectorAll('#event-log [data-type=agent_message]').length >= 1",
                               timeout=30_000)
        assert log_box.locator("[data-type=agent_message]").first.inner_text().count("Hello from a newcomer") == 1
        page.fill("#message", "And a second message")
        page.press("#message", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#event-log [data-type=agent_message]').length >= 2",
                               timeout=30_000)
        assert "And a second message" in log_box.locator("[data-type=agent_message]").nth(1).inner_text()
        assert page.page_errors == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the README says: gunicorn and the agents stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    assert proc.returncode == 0, read(log)[-2000:]
