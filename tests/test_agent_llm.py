"""The llm agent against a local chat-completions server: streamed replies, the messages sent, errors, cancellation."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.agent.base import AgentError, Conversation
from app.agent.llm import MAX_HISTORY_CHARS, SYSTEM_PROMPT, LlmAgent

from .fake_llm import FakeLLM, chunk_event
from .servers import ROOT, free_port

KEY = "sk-test-0123456789-secret"
CONVERSATION = Conversation("c1", None, None, None)
HELLO = {"id": 0, "type": "user_message", "source": "user", "content": "hello?"}


@pytest.fixture()
def fake() -> Iterator[FakeLLM]:
    """A fake server that wants KEY."""
    server = FakeLLM(key=KEY).start()
    yield server
    server.stop()


def agent(url: str, key: str = KEY, timeout: float = 10, model: str = "fake-model") -> LlmAgent:
    """An llm agent on that server."""
    return LlmAgent({"AGENT_LLM_BASE_URL": url, "AGENT_LLM_MODEL": model, "AGENT_LLM_API_KEY": key,
                     "AGENT_LLM_TIMEOUT_SECONDS": timeout})


def run(llm: LlmAgent, history: list[dict[str, Any]] | None = None,
        conversation: Conversation = CONVERSATION) -> list[dict[str, Any]]:
    """Every event of one run answering the last message of `history`."""
    history = history or [HELLO]
    return list(llm.run(conversation, history, history[-1]))


def failure(llm: LlmAgent, history: list[dict[str, Any]] | None = None) -> str:
    """The AgentError text a run ends with."""
    with pytest.raises(AgentError) as caught:
        run(llm, history)
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained trace
    return str(caught.value)


def test_streams_deltas_then_the_whole_reply(fake: FakeLLM) -> None:
    events = run(agent(fake.url))
    assert events[-1] == {"type": "agent_message", "content": "Hello world"}
    deltas = events[:-1]
    assert deltas and all(e["type"] == "agent_message_delta" for e in deltas)
    assert "".join(e["text"] for e in deltas) == "Hello world"
    (request,) = fake.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["headers"]["content-type"] == "application/json"
    assert request["body"]["model"] == "fake-model" and request["body"]["stream"] is True


def test_bits_that_arrive_together_are_one_delta(fake: FakeLLM) -> None:
    fake.raw = [chunk_event("a") + chunk_event("b") + chunk_event("c"), chunk_event("d", "stop"),
                b"data: [DONE]\n\n"]
    events = run(agent(fake.url))
    assert [e.get("text") for e in events[:-1]] == ["abc", "d"]
    assert events[-1]["content"] == "abcd"


def test_stream_variants_crlf_comments_no_space_multiline_no_chunking(fake: FakeLLM) -> None:
    fake.chunked = False  # the end of the connection is the end of the stream
    part = json.dumps({"choices": [{"delta": {"content": "x\ny"}, "finish_reason": None}]})
    fake.raw = [b": keep-alive\r\n\r\n", b"data:" + part.encode() + b"\r\n\r\n",
                b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n',  # no content: nothing to show
                b'data: {"usage": {"total_tokens": 3}}\n\n',
                b'data: {"choices": [{"delta": \ndata: {"content": "!"}, "finish_reason": "stop"}]}\n\n']
    events = run(agent(fake.url))
    assert events[-1] == {"type": "agent_message", "content": "x\ny!"}


def test_a_server_that_answers_one_json_body(fake: FakeLLM) -> None:
    fake.json_reply = "all at once"
    assert run(agent(fake.url)) == [{"type": "agent_message_delta", "text": "all at once"},
                                    {"type": "agent_message", "content": "all at once"}]


def test_the_messages_sent_are_the_dialogue_of_the_history(fake: FakeLLM) -> None:
    history = [
        {"id": 0, "type": "user_message", "source": "user", "content": "first question"},
        {"id": 1, "type": "agent_state_changed", "source": "agent", "agent_state": "running"},
        {"id": 2, "type": "agent_action", "source": "agent", "action": "read", "args": {"path": "README.md"}},
        {"id": 3, "type": "observation", "source": "environment", "observation": "read", "content": "file text"},
        {"id": 4, "type": "agent_message", "source": "agent", "content": "first answer"},
        {"id": 5, "action": "message", "source": "agent", "args": {"content": "an OpenHands agent message"}},
        {"id": 6, "type": "error", "source": "agent", "message": "oops"},
        {"id": 7, "action": "message", "source": "user", "args": {"content": "second question"}},
    ]
    conversation = Conversation("c1", "octo/cat", "dev", None)
    run(agent(fake.url), history, conversation)
    assert fake.requests[0]["body"]["messages"] == [
        {"role": "system", "content": f"{SYSTEM_PROMPT} The conversation is about the repository octo/cat "
                                      "(branch dev)."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "assistant", "content": "an OpenHands agent message"},
        {"role": "user", "content": "second question"},
    ]


def test_a_long_history_keeps_the_newest_turns(fake: FakeLLM) -> None:
    history = [{"id": i, "type": "user_message", "content": f"{i:03d}" + "x" * 997} for i in range(100)]
    run(agent(fake.url), history)
    messages = fake.requests[0]["body"]["messages"][1:]
    assert len(messages) == MAX_HISTORY_CHARS // 1000
    assert messages[-1]["content"].startswith("099") and messages[0]["content"].startswith(f"{100 - len(messages):03d}")


def test_the_answered_message_is_sent_even_when_not_in_the_history(fake: FakeLLM) -> None:
    llm = agent(fake.url)
    list(llm.run(CONVERSATION, [{"id": 0, "source": "agent", "type": "agent_message", "content": "hi"}],
                 {"id": 1, "type": "user_message", "content": "and now?"}))
    assert fake.requests[0]["body"]["messages"][1:] == [{"role": "assistant", "content": "hi"},
                                                        {"role": "user", "content": "and now?"}]


def test_no_key_sends_no_authorization_header() -> None:
    server = FakeLLM(key=None).start()
    try:
        assert run(agent(server.url, key=""))[-1]["content"] == "Hello world"
        assert "authorization" not in server.requests[0]["headers"]
    finally:
        server.stop()


def test_a_wrong_key_is_401_without_the_key_or_the_body(fake: FakeLLM) -> None:
    text = failure(agent(fake.url, key="sk-wrong-9876543210-secret"))
    assert text == ("The language model server answered HTTP 401 Unauthorized (invalid_api_key): "
                    "check AGENT_LLM_API_KEY.")
    assert "9876543210" not in text and "Incorrect" not in text


@pytest.mark.parametrize(("status", "phrase"), [(400, "Bad Request"), (404, "Not Found"),
                                                (429, "Too Many Requests"), (500, "Internal Server Error"),
                                                (503, "Service Unavailable"), (599, "")])
def test_error_statuses(fake: FakeLLM, status: int, phrase: str) -> None:
    fake.status = status
    text = failure(agent(fake.url))
    assert text.startswith(f"The language model server answered HTTP {status}{' ' + phrase if phrase else ''}")
    assert KEY not in text and "0123456789" not in text and "failed for" not in text


def test_a_wrong_path_is_404_with_a_hint(fake: FakeLLM) -> None:
    text = failure(agent(fake.url.removesuffix("/v1")))
    assert text == ("The language model server answered HTTP 404 Not Found (not_found): "
                    "check AGENT_LLM_BASE_URL and AGENT_LLM_MODEL.")


def test_unreachable_server() -> None:
    port = free_port()
    text = failure(agent(f"http://127.0.0.1:{port}/v1"))
    assert text == f"Cannot reach the language model server at 127.0.0.1:{port} (Connection refused)."


@pytest.mark.parametrize("url", ["", "   ", "ftp://127.0.0.1/v1", "http:///v1", "http://127.0.0.1:99999/v1"])
def test_unset_or_bad_base_url(url: str) -> None:
    text = failure(agent(url))
    assert "AGENT_LLM_BASE_URL" in text


def test_a_server_that_never_answers_times_out(fake: FakeLLM) -> None:
    fake.hang = True
    started = time.monotonic()
    text = failure(agent(fake.url, timeout=0.3))
    assert time.monotonic() - started < 5
    assert text.endswith("did not answer within 0.3 seconds.")
    assert fake.disconnected.wait(5)  # and the agent hung up


def test_a_stream_that_stalls_times_out(fake: FakeLLM) -> None:
    fake.hold_after = 1
    gen = agent(fake.url, timeout=0.3).run(CONVERSATION, [HELLO], HELLO)
    assert next(gen) == {"type": "agent_message_delta", "text": "Hel"}
    with pytest.raises(AgentError, match="stopped sending for 0.3 seconds"):
        next(gen)
    assert fake.disconnected.wait(5)


@pytest.mark.parametrize(("raw", "expected"), [
    ([b"data: not json\n\n"], "malformed stream (data that is not JSON)"),
    ([b"data: [1, 2]\n\n"], "malformed stream (a chunk that is not an object)"),
    ([b"data: \xff\xfe\n\n"], "malformed stream (not UTF-8)"),
    ([chunk_event("cut sh")], "stream ended before the reply was complete"),
    ([b'data: {"error": {"message": "boom"}}\n\n'], "reported an error in the middle of its reply"),
    ([chunk_event(finish="stop"), b"data: [DONE]\n\n"], "sent an empty reply"),
])
def test_malformed_or_broken_streams(fake: FakeLLM, raw: list[bytes], expected: str) -> None:
    fake.raw = raw
    assert expected in failure(agent(fake.url))


def test_a_stream_ended_by_finish_reason_without_done_is_complete(fake: FakeLLM) -> None:
    fake.raw = [chunk_event("done"), chunk_event(finish="stop")]
    assert run(agent(fake.url))[-1] == {"type": "agent_message", "content": "done"}


def test_closing_the_run_mid_stream_closes_the_connection(fake: FakeLLM) -> None:
    fake.hold_after = 1
    gen = agent(fake.url).run(CONVERSATION, [HELLO], HELLO)
    assert next(gen)["text"] == "Hel"
    gen.close()
    assert fake.disconnected.wait(5)


GEVENT_CANCEL = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, sys, gevent
    from app.agent.base import Conversation
    from app.agent.llm import LlmAgent

    hello = {"id": 0, "type": "user_message", "content": "hi"}
    agent = LlmAgent({"AGENT_LLM_BASE_URL": sys.argv[1], "AGENT_LLM_API_KEY": sys.argv[2],
                      "AGENT_LLM_TIMEOUT_SECONDS": 30})
    events = []
    run = gevent.spawn(lambda: events.extend(agent.run(Conversation("c", None, None, None), [hello], hello)))
    with gevent.Timeout(10):
        while not events:
            gevent.sleep(0.01)
    # the run now waits on the socket for more: the stop button's GreenletExit lands there
    run.kill(timeout=5)
    print(json.dumps({"events": events, "dead": run.dead, "killed": type(run.value).__name__}))
""")


def test_greenlet_exit_in_a_patched_worker_closes_the_connection(fake: FakeLLM) -> None:
    fake.hold_after = 1
    done = subprocess.run([sys.executable, "-c", GEVENT_CANCEL, fake.url, KEY], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"events": [{"type": "agent_message_delta", "text": "Hel"}], "dead": True,
                      "killed": "GreenletExit"}
    assert fake.disconnected.wait(5)
