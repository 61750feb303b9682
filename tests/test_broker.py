"""The hub's pub/sub listener on a real Redis, under gevent (in a child process, as in a worker)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT = SCRIPTS.parent.parent


def run_script(name: str, redis_url: str) -> dict:
    """Run tests/scripts/<name> (it patches with gevent first, as a worker does); the JSON it prints."""
    out = subprocess.run([sys.executable, str(SCRIPTS / name), redis_url], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_connection_cut_while_the_hub_is_busy_is_made_again_with_every_channel(redis_server, redis_client):
    """redis-py would reconnect a closed connection on the next send, behind the read loop's back."""
    seen = run_script("listener_kill_while_busy.py", redis_server.url)
    assert seen["reconnects"] == 1 and seen["confirmed"], seen
    assert seen["received"] == [f"ch{i}" for i in range(9)], seen  # every channel, old and new
    assert seen["pubsub_clients"] == 1, seen


def test_what_pubsub_missed_is_read_again_until_it_succeeds(redis_server, redis_client):
    """A quiet conversation has no later event to reveal the gap: the resync itself must retry."""
    seen = run_script("hub_resync_retried.py", redis_server.url)
    assert seen["failures"] == 1 and seen["last_sent"] == 1, seen
    assert seen["ids"] == ["id: 0", "id: 1"], seen


def test_an_event_announced_just_before_the_deletion_still_goes_out(redis_server, redis_client):
    seen = run_script("hub_delete_after_event.py", redis_server.url)
    assert seen["end_reason"] == "deleted", seen
    assert seen["ids"] == ["id: 0", "id: 1"], seen
