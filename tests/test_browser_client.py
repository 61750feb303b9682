"""The browser client (app/static/openhands-client.js) in Chromium: the product's example, live replies, stop, sends.

Each test serves a small page on the test server's own origin (intercepted by Playwright, so the
app needs no test routes) that loads the client module, a harness recording what every client
emits, then the test's own script; real gunicorn, Redis and agent worker behind it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from .fake_llm import FakeLLM
from .servers import ROOT, wait_until

PREFIX = "/__client_test__/"
PRODUCT = Path(ROOT).parent / "shared" / "PRODUCT.md"

# Records each client's events in window.logs[name] (JSON-safe), and console.log/error calls in
# window.consoleCalls (arguments through a JSON round trip), before the page's own scripts run.
HARNESS = """
window.consoleCalls = [];
for (const level of ['log', 'error']) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    window.consoleCalls.push({level, args: args.map((a) => {
      try { return JSON.parse(JSON.stringify(a)); } catch (e) { return String(a); }
    })});
    original(...args);
  };
}
window.logs = {};
window.clients = {};
window.track = (name, client) => {
  const log = {messages: [], deltas: [], states: [], agentStates: [], connections: [], closes: [],
               errors: [], truncated: []};
  client.on('message', (e) => log.messages.push(e)).on('delta', (d) => log.deltas.push(d))
    .on('state', (s) => log.states.push(s)).on('agent_state', (s) => log.agentStates.push(s))
    .on('connection', (c) => log.connections.push(c)).on('close', (c) => log.closes.push(c))
    .on('history_truncated', (t) => log.truncated.push(t))
    .on('error', (e) => log.errors.push({
      type: e.type, code: e.error && e.error.code, status: e.error && e.error.status,
      readyState: e.error && e.error.target ? e.error.target.readyState : null}));
  window.logs[name] = log;
  window.clients[name] = client;
  return client;
};
window.harnessReady = true;
"""


def open_client_page(page: Any, base: str, scripts: dict[str, str] | None = None) -> None:
    """Load the client module, the harness, then `scripts` (name -> JS, deferred, in order) at `base`."""
    files = {"harness.js": HARNESS, **(scripts or {})}
    tags = "".join(f'<script defer src="{PREFIX}{name}"></script>' for name in files)
    html = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>client test</title>'
            f'<script type="module" src="/static/openhands-client.js"></script>{tags}</head><body></body></html>')

    def serve(route: Any) -> None:
        name = route.request.url.split(PREFIX, 1)[1].split("?", 1)[0]
        if name == "index.html":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)
        elif name in files:
            route.fulfill(status=200, content_type="text/javascript; charset=utf-8", body=files[name])
        else:
            route.fulfill(status=404, content_type="text/plain", body="no such test file")

    page.route(f"{base}{PREFIX}**", serve)
    page.goto(f"{base}{PREFIX}index.html")
    page.wait_for_function("window.harnessReady === true && typeof window.OpenHandsClient === 'function'")


def new_client(page: Any, name: str, key: str | None, options: dict[str, Any] | None = None) -> None:
    """Make a client `name` in the page (window.clients[name]), its events recorded in window.logs[name]."""
    page.evaluate("([name, key, options]) => { track(name, new OpenHandsClient(key, '', options)); }",
                  [name, key, options or {}])


def log_of(page: Any, name: str) -> dict[str, Any]:
    """What client `name` emitted so far."""
    return page.evaluate("(name) => window.logs[name]", name)


def wait_js(page: Any, expression: str, arg: Any = None, timeout: float = 20) -> None:
    """Wait (at most `timeout` seconds) until `expression` (a JS function of `arg`) is truthy in the page."""
    page.wait_for_function(expression, arg=arg, timeout=timeout * 1000)


def echo_client(start_web: Any, page: Any, options: dict[str, Any]) -> tuple[Any, str]:
    """An echo agent's stack, a new conversation, the client page with client "a" (not connected); stack and id."""
    stack = start_web(agent="echo")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key, options)
    return stack, cid


def rest_events(api: Any, cid: str) -> list[dict[str, Any]]:
    """The conversation's stored events, over REST."""
    status, body, _ = api.call("GET", f"/api/conversations/{cid}/events?limit=1000")
    assert status == 200, body
    return body["events"]


def usage_example() -> str:
    """The javascript block under "## Usage Example" of the product document."""
    if not PRODUCT.exists():
        pytest.skip(f"the product document is not at {PRODUCT}")
    section = PRODUCT.read_text().split("## Usage Example", 1)
    assert len(section) == 2, "PRODUCT.md has no '## Usage Example' section"
    match = re.search(r"```javascript\n(.*?)```", section[1], re.S)
    assert match, "no javascript block under '## Usage Example'"
    return match.group(1)


def test_product_usage_example_runs_unchanged(start_web, page) -> None:
    """The product document's usage example, its key made real, gets the connection and every message."""
    stack = start_web(agent="auto")
    example = usage_example()
    assert example.count("'your-api-key'") == 1
    open_client_page(page, stack.base, {"example.js": example.replace("'your-api-key'", f"'{stack.key}'")})

    labels = ("Agent says:", "Agent performed action:", "Received event:")
    count = f"window.consoleCalls.filter((c) => {json.dumps(list(labels))}.includes(c.args[0])).length"
    wait_js(page, f"() => {count} >= 8", timeout=30)
    calls = page.evaluate("window.consoleCalls")
    [created] = [c["args"][1] for c in calls if c["args"][0] == "Conversation created:"]
    cid = created["conversation_id"]
    [connected] = [c["args"][1] for c in calls if c["args"][0] == "Connected:"]
    assert connected["conversation_id"] == cid and connected["connection_id"]
    assert connected["type"] == "connection_established"  # PRODUCT's {type: 'sse', ...data}: the data's wins
    assert not [c for c in calls if c["level"] == "error"], calls

    events = rest_events(stack.api, cid)
    assert [e["id"] for e in events] == list(range(8))
    expected = []
    for event in events:
        if event["type"] == "agent_message":
            expected.append(["Agent says:", event["content"]])
        elif event["type"] == "agent_action":
            expected.append(["Agent performed action:", event])
        else:
            expected.append(["Received event:", event])
    assert [c["args"] for c in calls if c["args"][0] in labels] == expected  # each once, in id order

    users = [e for e in events if e["type"] == "user_message"]
    assert [u["content"] for u in users] == [
        "Check whether there is any incorrect information in the README.md file and send me updates",
        "Hello, I need help with my repository"]
    for user in users:  # the auto agent's readme agent answers each: the repository is not in its workspace
        answer = [(e["type"], e.get("agent_state"), e.get("content")) for e in events if e.get("cause") == user["id"]]
        assert [a[:2] for a in answer] == [("agent_state_changed", "running"), ("agent_message", None),
                                           ("agent_state_changed", "awaiting_user_input")]
        assert answer[1][2].startswith("I could not find the repository yourusername/your-repo: there is no folder")
    assert page.evaluate("[client.state, client.lastEventId, client.agentState]") == [
        "open", 7, "awaiting_user_input"]
    assert page.page_errors == []


def start_llm(start_web, fake: FakeLLM):
    """A web stack whose agent is the llm agent on the fake server."""
    return start_web(agent="llm", AGENT_LLM_BASE_URL=fake.url, AGENT_LLM_MODEL="fake", AGENT_LLM_API_KEY="test-key")


def ask_the_llm(start_web, page: Any, fake: FakeLLM, chunks: list[str],
                question: str = "Tell me a story") -> tuple[Any, str]:
    """The llm agent's stack, its reply `chunks` 50 ms apart; client "a" creates a conversation asking `question`.

    The stack and the conversation's id, the reply under way.
    """
    fake.chunks = chunks
    fake.delay = 0.05
    stack = start_llm(start_web, fake)
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key)
    cid = page.evaluate("async (q) => (await clients.a.createConversation(null, q)).conversation_id", question)
    return stack, cid


def assert_grows(deltas: list[dict[str, Any]], final: str) -> None:
    """Each delta continues the one before (offset = the reply so far) and the reply so far is final's prefix."""
    content = ""
    for delta in deltas:
        if delta["offset"] != 0:
            assert delta["offset"] == len(content), (delta, content)
        content = content[:delta["offset"]] + delta["text"]
        assert delta["content"] == content
        assert final.startswith(content), (content, final)


def test_live_reply_deltas_rebuild_the_reply_and_a_late_client_catches_up(start_web, fake_llm, page) -> None:
    """Deltas grow by offset to the final text, stored once; a client joining mid-reply gets the text so far."""
    # Emoji among the bits: code points, not UTF-16 units.
    stack, cid = ask_the_llm(start_web, page, fake_llm, [f"w{i}{'😀' if i % 7 == 3 else ''} " for i in range(60)])
    final = "".join(fake_llm.chunks)
    wait_js(page, "() => logs.a.deltas.length >= 10")
    new_client(page, "b", stack.key)
    page.evaluate("(cid) => clients.b.connect(cid).then(() => undefined)", cid)
    done = "(n) => logs[n].messages.some((e) => e.type === 'agent_state_changed' && e.agent_state !== 'running')"
    wait_js(page, done, "a", timeout=30)
    wait_js(page, done, "b", timeout=30)

    events = rest_events(stack.api, cid)
    assert [(e["type"], e.get("agent_state")) for e in events] == [
        ("user_message", None), ("agent_state_changed", "running"), ("agent_message", None),
        ("agent_state_changed", "awaiting_user_input")]
    assert events[2]["content"] == final and events[2]["cause"] == 0
    a, b = log_of(page, "a"), log_of(page, "b")
    assert a["messages"] == events and b["messages"] == events  # once each, the full text
    assert {d["cause"] for d in a["deltas"] + b["deltas"]} == {0}
    assert a["deltas"][0]["offset"] == 0 and len(a["deltas"]) >= 10
    assert_grows(a["deltas"], final)
    first = b["deltas"][0]
    assert first["offset"] == 0 and len(first["text"]) >= len("".join(fake_llm.chunks[:10])), first
    assert_grows(b["deltas"], final)
    assert a["agentStates"][-1] == b["agentStates"][-1] == "awaiting_user_input"
    assert page.page_errors == []


def test_stop_ends_a_long_reply(start_web, fake_llm, page) -> None:
    """stop() posts {type: 'stop'} during a long reply: agent_state becomes 'stopped' within seconds."""
    # 1000 bits 50 ms apart: 50 s, were it not stopped.
    stack, cid = ask_the_llm(start_web, page, fake_llm, [f"w{i} " for i in range(1000)], "Talk a lot")
    wait_js(page, "() => clients.a.agentState === 'running' && logs.a.deltas.length >= 3")
    answer = page.evaluate("async () => await clients.a.stop()")
    assert answer["status"] == "ok" and isinstance(answer["event_id"], int)
    wait_js(page, "() => logs.a.agentStates.includes('stopped')", timeout=5)
    wait_until(fake_llm.disconnected.is_set, 10, what="the agent to hang up on the model")

    a = log_of(page, "a")
    assert a["agentStates"] == ["running", "stopped"]
    assert page.evaluate("clients.a.agentState") == "stopped"
    kinds = [(e["type"], e.get("agent_state")) for e in a["messages"]]
    assert ("stop", None) in kinds and kinds[-1] == ("agent_state_changed", "stopped")
    assert [e for e in a["messages"] if e["id"] == answer["event_id"]][0]["type"] == "stop"
    assert a["messages"] == rest_events(stack.api, cid)
    assert page.page_errors == []


def test_send_action_retries_a_lost_reply_with_the_same_key_and_never_a_400(start_web, page) -> None:
    """A reply lost after the server stored the action: retried with the same key, stored once; a 400 is not retried."""
    stack, cid = echo_client(start_web, page, {"minRetryMs": 50, "maxRetryMs": 200})
    page.evaluate("(cid) => clients.a.connect(cid).then(() => undefined)", cid)
    wait_js(page, "() => clients.a.state === 'open'")

    keys: list[str | None] = []
    first_status: list[int] = []

    def lose_first_reply(route: Any) -> None:
        if route.request.method != "POST":
            return route.continue_()
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            first_status.append(route.fetch().status)  # it reached the server ...
            return route.abort("connectionreset")  # ... but the page never hears the answer
        return route.continue_()

    page.route(f"{stack.base}/api/conversations/{cid}/events", lose_first_reply)
    answer = page.evaluate("async () => await clients.a.sendAction({type: 'user_message', content: 'once'})")
    assert first_status == [200]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    stored = [e for e in rest_events(stack.api, cid) if e["type"] == "user_message"]
    assert [(e["id"], e["content"]) for e in stored] == [(answer["event_id"], "once")]

    failure = page.evaluate("""async () => {
      try { await clients.a.sendAction({type: 'user_message'}); return null; }
      catch (e) { return {name: e.name, status: e.status, code: e.code, retryable: e.retryable,
                          typed: e instanceof OpenHandsError, message: e.message}; }
    }""")
    assert failure is not None and failure["typed"], failure
    assert {k: failure[k] for k in ("name", "status", "code", "retryable")} == {
        "name": "OpenHandsError", "status": 400, "code": "bad_request", "retryable": False}
    assert "content" in failure["message"]
    assert len(keys) == 3  # one try only
    assert [e for e in log_of(page, "a")["errors"] if e["type"] == "api"] == [
        {"type": "api", "code": "bad_request", "status": 400, "readyState": None}]

    again = page.evaluate("""async () => {
      const action = {type: 'user_message', content: 'keyed'};
      return [await clients.a.sendUserMessage('twice?'),
              await clients.a.sendAction(action, {idempotencyKey: 'my-key-1'}),
              await clients.a.sendAction(action, {idempotencyKey: 'my-key-1'})];
    }""")
    assert again[1]["event_id"] == again[2]["event_id"]
    contents = [e["content"] for e in rest_events(stack.api, cid) if e["type"] == "user_message"]
    assert contents == ["once", "twice?", "keyed"]
    assert page.page_errors == []


def test_send_action_waits_out_a_429s_retry_after(start_web, page) -> None:
    """A 429 with Retry-After: 1 is retried with the same key no sooner than a second later; stored once."""
    stack, cid = echo_client(start_web, page, {"minRetryMs": 10, "maxRetryMs": 5000})
    page.evaluate("(cid) => { clients.a.conversationId = cid; }", cid)  # REST only: no stream
    tries: list[tuple[float, str | None]] = []

    def refuse_first(route: Any) -> None:
        tries.append((time.monotonic(), route.request.headers.get("idempotency-key")))
        if len(tries) == 1:
            return route.fulfill(status=429, headers={"Retry-After": "1"}, content_type="application/json",
                                 body=json.dumps({"status": "error", "error": "too_many_requests", "message": "wait"}))
        return route.continue_()

    page.route(f"{stack.base}/api/conversations/{cid}/events", refuse_first)
    answer = page.evaluate("async () => await clients.a.sendUserMessage('after a wait')")
    assert len(tries) == 2 and tries[0][1] == tries[1][1]
    assert tries[1][0] - tries[0][0] >= 0.9
    stored = [(e["id"], e["content"]) for e in rest_events(stack.api, cid) if e["type"] == "user_message"]
    assert stored == [(answer["event_id"], "after a wait")]
    assert log_of(page, "a")["errors"] == []  # a retry that succeeds is no error
    assert page.page_errors == []


def test_user_posted_agent_events_move_neither_the_agent_state_nor_the_reply(start_web, fake_llm, page) -> None:
    """A user may post type agent_state_changed / agent_message (source 'user'): the agent's state and reply go on."""
    stack, cid = ask_the_llm(start_web, page, fake_llm, [f"w{i} " for i in range(40)])
    final = "".join(fake_llm.chunks)
    wait_js(page, "() => clients.a.agentState === 'running' && logs.a.deltas.length >= 3")
    forged = [stack.api.post(cid, type="agent_state_changed", agent_state="error", cause=0),
              stack.api.post(cid, type="agent_message", cause=0, content="forged")]
    wait_js(page, "(id) => clients.a.lastEventId >= id", forged[-1])
    seen = len(log_of(page, "a")["deltas"])
    assert page.evaluate("clients.a.agentState") == "running"
    wait_js(page, "() => logs.a.agentStates.includes('awaiting_user_input')", timeout=30)

    a = log_of(page, "a")
    assert a["agentStates"] == ["running", "awaiting_user_input"]
    assert [(e["source"], e["type"]) for e in a["messages"] if e["id"] in forged] == [
        ("user", "agent_state_changed"), ("user", "agent_message")]
    assert len(a["deltas"]) > seen  # the live reply went on after the forged events
    assert_grows(a["deltas"], final)
    assert [e["content"] for e in a["messages"] if e["type"] == "agent_message" and e["source"] == "agent"] == [final]
    assert page.page_errors == []
