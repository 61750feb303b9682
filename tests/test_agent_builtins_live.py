"""The built-in agents run by real workers, watched over HTTP: readme on a sample and a cloned repository, llm live."""
from __future__ import annotations

import time

import pytest

from app.agent.readme import make_sample_repository

from .conftest import Api, bearer
from .fake_llm import FakeLLM
from .servers import wait_until
from .sse_client import open_stream
from .test_agent_readme import remote  # noqa: F401 - the fixture: a bare repository octo/cat
from .test_agent_runtime import agents  # noqa: F401 - the fixture: real agent workers


@pytest.fixture()
def api(start_server, make_key) -> Api:
    """Alice on a gunicorn server."""
    return Api(start_server().base, make_key("alice"))


def stream_of(api: Api, cid: str, after: int = -1):
    """An open SSE stream of the conversation."""
    port = int(api.base.rsplit(":", 1)[1])
    stream = open_stream(port, f"/api/sse/conversations/{cid}/events?latest_event_id={after}", headers=bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    return stream


def until_state(stream, state: str, timeout: float = 30) -> list:
    """Every event (named ones included) until the run's agent_state_changed to `state`."""
    got = []
    for ev in stream.events(timeout=timeout):
        got.append(ev)
        if ev.event == "message" and ev.json().get("agent_state") == state:
            return got
    raise AssertionError(f"no {state} in {[(e.event, e.data[:80]) for e in got]}")


def test_readme_checks_the_sample_repository_in_visible_steps(agents, api, tmp_path):  # noqa: F811
    workspace = tmp_path / "workspace"
    repository = make_sample_repository(workspace)
    agents(AGENT="auto", AGENT_WORKSPACE=str(workspace))
    cid = api.create(initial_user_msg="Check whether there is any incorrect information in the README.md file",
                     repository=repository)
    events = [ev.json() for ev in until_state(stream_of(api, cid), "awaiting_user_input")]
    run = [e for e in events if e.get("cause") == 0]
    assert run[0]["agent_state"] == "running"
    actions = [e for e in run if e["type"] == "agent_action"]
    observations = [e for e in run if e["type"] == "observation"]
    assert actions[0]["action"] == "read" and actions[0]["args"] == {"path": "README.md"}
    assert len(actions) == len(observations) > 3
    assert [o["action_id"] for o in observations] == [a["id"] for a in actions]
    report = [e for e in run if e["type"] == "agent_message"][-1]["content"]
    for mistake in ("greet.py", "docs/setup.md", "#configuration"):
        assert mistake in report, report
    assert "line 10" in report  # `python3 greet.py` is on line 10 of the sample README


def test_readme_clones_a_missing_repository_from_the_git_base(agents, api, tmp_path, remote):  # noqa: F811
    workspace = tmp_path / "empty-workspace"
    agents(AGENT="readme", AGENT_WORKSPACE=str(workspace), AGENT_GIT_BASE_URL=str(remote))
    cid = api.create(initial_user_msg="check the README", repository="octo/cat")
    events = [ev.json() for ev in until_state(stream_of(api, cid), "awaiting_user_input")]
    assert (workspace / "octo" / "cat" / "README.md").is_file()
    report = [e for e in events if e["type"] == "agent_message"][-1]["content"]
    assert "docs/cat.md" in report and "line 3" in report


def test_readme_says_clearly_when_the_repository_is_not_there(agents, api, tmp_path):  # noqa: F811
    agents(AGENT="readme", AGENT_WORKSPACE=str(tmp_path / "nothing-here"))
    cid = api.create(initial_user_msg="check the README", repository="octo/missing")
    events = [ev.json() for ev in until_state(stream_of(api, cid), "awaiting_user_input")]
    report = [e for e in events if e["type"] == "agent_message"][-1]["content"]
    assert "octo/missing" in report


@pytest.fixture()
def llm() -> FakeLLM:
    """A local chat-completions server."""
    server = FakeLLM(key="sk-test-secret").start()
    yield server
    server.stop()


def llm_settings(llm: FakeLLM) -> dict[str, str]:  # noqa: F811
    """The settings that point the llm agent at the fake server."""
    return {"AGENT": "llm", "AGENT_LLM_BASE_URL": llm.url, "AGENT_LLM_MODEL": "fake-1",
            "AGENT_LLM_API_KEY": "sk-test-secret"}


def test_llm_reply_streams_as_deltas_then_one_stored_message(agents, api, llm):  # noqa: F811
    llm.chunks = ["The ", "README ", "looks ", "right."]
    llm.delay = 0.15
    agents(**llm_settings(llm))
    cid = api.create()
    stream = stream_of(api, cid)
    ask = api.post(cid, type="user_message", content="Is the README right?")
    got = until_state(stream, "awaiting_user_input")
    deltas = [ev for ev in got if ev.event == "agent_message_delta"]
    assert deltas and all(ev.id is None for ev in deltas)
    text = ""
    for ev in deltas:
        bit = ev.json()
        assert bit["cause"] == ask and bit["offset"] == len(text)
        text += bit["text"]
    assert text == "The README looks right."
    stored = [ev.json() for ev in got if ev.event == "message"]
    messages = [e for e in stored if e["type"] == "agent_message"]
    assert [m["content"] for m in messages] == ["The README looks right."] and messages[0]["cause"] == ask
    # The deltas came between the run's start and its one stored message.
    order = [ev.event if ev.event != "message" else ev.json()["type"] for ev in got]
    assert order.index("agent_message") > max(i for i, kind in enumerate(order) if kind == "agent_message_delta")
    assert llm.requests[-1]["body"]["messages"][-1] == {"role": "user", "content": "Is the README right?"}


def test_a_stream_opened_mid_reply_gets_the_text_so_far_then_the_rest(agents, api, llm):  # noqa: F811
    llm.chunks = ["one ", "two ", "three ", "four ", "five"]
    llm.delay = 0.4
    agents(**llm_settings(llm))
    cid = api.create()
    first = stream_of(api, cid)
    api.post(cid, type="user_message", content="count")
    wait_until(lambda: any(ev.event == "agent_message_delta" for ev in first.take(1, timeout=5)), 10,
               what="the reply to begin")
    time.sleep(0.5)
    late = stream_of(api, cid)
    got = until_state(late, "awaiting_user_input")
    deltas = [ev.json() for ev in got if ev.event == "agent_message_delta"]
    assert deltas[0]["offset"] == 0 and len(deltas[0]["text"]) > 0  # the text so far, at once
    text = ""
    for bit in deltas:
        assert bit["offset"] == len(text)
        text += bit["text"]
    assert text == "one two three four five"


def test_stop_during_a_reply_cuts_the_model_request_off(agents, api, llm):  # noqa: F811
    llm.chunks = ["a ", "b ", "c"]
    llm.hold_after = 1  # one bit, then the server keeps the request open
    agents(**llm_settings(llm))
    cid = api.create()
    stream = stream_of(api, cid)
    api.post(cid, type="user_message", content="talk")
    wait_until(lambda: any(ev.event == "agent_message_delta" for ev in stream.take(1, timeout=5)), 10,
               what="the reply to begin")
    api.post(cid, type="stop")
    stopped_at = time.monotonic()
    until_state(stream, "stopped", timeout=5)
    assert time.monotonic() - stopped_at < 1.0
    assert llm.disconnected.wait(2)  # the agent's connection to the model was closed
    status, conversation, _ = api.call("GET", f"/api/conversations/{cid}")
    assert conversation["agent_state"] == "stopped"


def test_llm_errors_reach_the_user_safely(agents, api, llm):  # noqa: F811
    llm.status = 500
    agents(**llm_settings(llm))
    cid = api.create(initial_user_msg="hello")
    events = [ev.json() for ev in until_state(stream_of(api, cid), "error")]
    error = [e for e in events if e["type"] == "error"][-1]
    assert "500" in error["message"] and "sk-test-secret" not in error["message"]

