"""The browser client under faults: a killed worker, Redis down, a deleted conversation, a revoked key, trimmed history.

Pages and helpers as in test_browser_client.py; every event must reach the page exactly once, in id order.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

from .servers import ROOT, VENV_BIN, RedisServer, wait_until
from .test_browser_client import log_of, new_client, open_client_page, rest_events, wait_js

FAST = {"minRetryMs": 100, "maxRetryMs": 1000, "sendAttempts": 10}


def connect(page: Any, name: str, cid: str) -> None:
    """Connect client `name` to `cid` and wait until its stream is open."""
    page.evaluate("([name, cid]) => clients[name].connect(cid).then(() => undefined)", [name, cid])
    wait_js(page, "(name) => clients[name].state === 'open'", name)


def states(page: Any, name: str) -> list[str]:
    """The states client `name` went through."""
    return [s["state"] for s in log_of(page, name)["states"]]


def assert_reopened(seen: list[str]) -> None:
    """The states were connecting, open, then reconnecting ... and open again (never closed)."""
    assert seen[:2] == ["connecting", "open"], seen
    assert "reconnecting" in seen and seen[-1] == "open" and "closed" not in seen, seen
    assert seen.index("open", seen.index("reconnecting")) > seen.index("reconnecting"), seen


def kill_worker(stack: Any) -> None:
    """SIGKILL gunicorn's (only) worker and wait until the master has started another."""
    [pid] = stack.gunicorn.worker_pids()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (pids := stack.gunicorn.worker_pids()) and pid not in pids, 30, what="a new worker")


def read_three_notes(start_web: Any, page: Any, label: str, **env: str) -> tuple[Any, str]:
    """An echo agent's stack, a conversation of 3 notes ("<label> 0" ...), client "a" connected, ids 0-2 read."""
    stack = start_web(agent="echo", **env)
    cid = stack.api.create()
    for i in range(3):
        stack.api.post(cid, type="note", content=f"{label} {i}")
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key, FAST)
    connect(page, "a", cid)
    wait_js(page, "() => clients.a.lastEventId === 2")
    return stack, cid


def test_killed_worker_every_event_once_in_order(start_web, page) -> None:
    """SIGKILL of the stream's worker while the agent answers: the page gets ids 0..N once, as REST lists them."""
    stack = start_web(agent="echo", SSE_RETRY_MS="300")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key, FAST)
    connect(page, "a", cid)
    count = 40
    page.evaluate("""(count) => {
      window.posted = null;
      (async () => {
        const ids = [];
        for (let i = 0; i < count; i += 1) {
          ids.push((await clients.a.sendUserMessage('m' + i)).event_id);
          await new Promise((resolve) => setTimeout(resolve, 40));  // a steady flow of writes
        }
        window.posted = ids;
      })().catch((e) => { window.posted = String(e); });
    }""", count)
    wait_js(page, "() => logs.a.messages.length >= 12")
    kill_worker(stack)
    wait_js(page, "() => window.posted !== null", timeout=60)
    posted = page.evaluate("window.posted")
    assert isinstance(posted, list) and len(posted) == count, posted
    answered = f"""() => logs.a.messages.filter((e) => e.type === 'agent_message').length === {count}
      && logs.a.messages[logs.a.messages.length - 1].agent_state === 'awaiting_user_input'"""
    wait_js(page, answered, timeout=60)

    events = rest_events(stack.api, cid)
    messages = log_of(page, "a")["messages"]
    assert [e["id"] for e in messages] == list(range(len(events)))
    assert messages == events
    assert [e["content"] for e in events if e["type"] == "user_message"] == [f"m{i}" for i in range(count)]
    assert sorted(posted) == [e["id"] for e in events if e["type"] == "user_message"]
    assert_reopened(states(page, "a"))
    assert page.page_errors == []


def test_redis_down_the_client_reopens_the_stream_itself(start_web, page, tmp_path) -> None:
    """Redis stopped, the stream's worker killed: its URL answers 503 for a while; the client reopens it later."""
    own = RedisServer(tmp_path / "own-redis", appendonly=True).start()
    try:
        stack = start_web(agent="echo", redis_url=own.url, SSE_RETRY_MS="300", REDIS_TIMEOUT_SECONDS="1")
        cid = stack.api.create()
        for i in range(3):
            stack.api.post(cid, type="note", content=f"before {i}")
        open_client_page(page, stack.base)
        new_client(page, "a", stack.key, {"minRetryMs": 200, "maxRetryMs": 1500})
        connect(page, "a", cid)
        wait_js(page, "() => clients.a.lastEventId === 2")

        own.stop()
        probes: list[int] = []
        page.on("response", lambda r: r.request.method == "HEAD" and probes.append(r.status))
        kill_worker(stack)  # the stream ends; the client's probes of its URL are answered 503 until Redis is back
        for _ in range(200):  # Playwright dispatches the page's events while the page is waited on
            if 503 in probes:
                break
            page.wait_for_timeout(100)
        assert 503 in probes, probes
        assert page.evaluate("clients.a.state") == "reconnecting"
        # One error, the stream's end: a probe that may succeed later is no error.
        assert [e["type"] for e in log_of(page, "a")["errors"]] == ["sse"]
        own.start()  # same port, same append-only file
        wait_until(lambda: stack.api.call("GET", f"/api/conversations/{cid}")[0] == 200, 20, what="the service back")
        for i in range(3):
            stack.api.post(cid, type="note", content=f"after {i}")
        wait_js(page, "() => clients.a.lastEventId === 5 && clients.a.state === 'open'", timeout=30)

        a = log_of(page, "a")
        assert [e["id"] for e in a["messages"]] == list(range(6))
        assert a["messages"] == rest_events(stack.api, cid)
        assert a["connections"][-1]["latest_event_id"] == 2  # the new EventSource resumed after event 2
        assert_reopened(states(page, "a"))
        delays = [s["delayMs"] for s in a["states"] if s["state"] == "reconnecting" and s["delayMs"] is not None]
        assert all(0 <= d <= 1500 for d in delays), delays
        assert page.page_errors == []
    finally:
        own.stop()


def test_deleted_conversation_closes_not_found(start_web, page) -> None:
    """Deleting the conversation ends the stream: close {reason: 'not_found'}, state closed, no retrying."""
    stack = start_web(agent="echo", SSE_RETRY_MS="300")
    cid = stack.api.create(initial_user_msg="hello")
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key, FAST)
    connect(page, "a", cid)
    wait_js(page, "() => logs.a.messages.some((e) => e.type === 'agent_message')")
    status, _, _ = stack.api.call("DELETE", f"/api/conversations/{cid}")
    assert status == 200
    wait_js(page, "() => logs.a.closes.length > 0")
    a = log_of(page, "a")
    assert a["closes"] == [{"reason": "not_found"}]
    assert states(page, "a")[-1] == "closed"
    assert page.evaluate("[clients.a.state, clients.a.connected, clients.a.eventSource]") == ["closed", False, None]
    assert page.page_errors == []


def test_revoked_key_closes_unauthorized(start_web, page) -> None:
    """A key revoked with the CLI ends its stream: close {reason: 'unauthorized'}."""
    stack = start_web(agent="echo", SSE_RETRY_MS="300")
    bob = stack.make_key("bob")
    open_client_page(page, stack.base)
    new_client(page, "b", bob, FAST)
    page.evaluate("async () => { await clients.b.createConversation(null, 'hi'); }")
    wait_js(page, "() => clients.b.state === 'open'")
    revoked = subprocess.run([str(VENV_BIN / "flask"), "--app", "wsgi", "keys", "revoke", bob], cwd=ROOT,
                             env={**os.environ, "REDIS_URL": stack.redis_url}, capture_output=True, text=True,
                             timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    wait_js(page, "() => logs.b.closes.length > 0", timeout=15)
    assert log_of(page, "b")["closes"] == [{"reason": "unauthorized"}]
    assert page.evaluate("clients.b.state") == "closed"
    failure = page.evaluate("async () => { try { await clients.b.sendUserMessage('x'); } "
                            "catch (e) { return e.status; } }")
    assert failure == 401
    assert page.page_errors == []


def test_history_truncated_is_surfaced_and_delivery_goes_on(start_web, page) -> None:
    """Resuming from an id retention dropped: history_truncated {earliest_event_id}, then every kept event once."""
    stack, cid = read_three_notes(start_web, page, "early", EVENT_RETENTION="5")
    page.evaluate("clients.a.disconnect()")
    for i in range(20):
        stack.api.post(cid, type="note", content=f"later {i}")
    earliest = rest_events(stack.api, cid)[0]["id"]
    assert earliest > 3
    connect(page, "a", cid)  # the same conversation: resumes after event 2, which is long gone
    wait_js(page, "() => clients.a.lastEventId === 22")
    for i in range(2):
        stack.api.post(cid, type="note", content=f"last {i}")
    wait_js(page, "() => clients.a.lastEventId === 24")

    a = log_of(page, "a")
    assert a["truncated"] == [{"earliest_event_id": earliest}]
    assert a["closes"] == [{"reason": "disconnect"}]
    assert [e["id"] for e in a["messages"]] == [0, 1, 2, *range(earliest, 25)]
    kept = rest_events(stack.api, cid)
    assert [e for e in a["messages"] if e["id"] >= kept[0]["id"]] == kept
    assert page.page_errors == []


def test_a_delta_after_a_gap_is_dropped_until_the_text_so_far(start_web, page) -> None:
    """A delta starting past the reply so far is never glued on; the reply's deltas wait for an offset-0 one."""
    stack = start_web(agent="echo")
    cid = stack.api.create()
    opening = {"type": "connection_established", "connection_id": "x", "conversation_id": cid,
               "latest_event_id": -1, "providers_set": ["github"], "agent_state": "running"}
    deltas = [(0, 0, "ab"), (0, 5, "XYZ"), (0, 2, "cd"), (1, 0, "ok"), (0, 0, "ab😀defg"), (0, 7, "h"), (1, 2, "!")]
    stream = f"retry: 60000\nevent: connection\ndata: {json.dumps(opening)}\n\n" + "".join(
        f"event: agent_message_delta\ndata: {json.dumps({'cause': c, 'offset': o, 'text': t})}\n\n"
        for c, o, t in deltas)
    served: list[str] = []

    def first_stream_made_up(route: Any) -> None:
        if route.request.method != "GET" or served:
            return route.continue_()  # the probe, and the reconnects: the real (empty) conversation
        served.append(route.request.url)
        return route.fulfill(status=200, content_type="text/event-stream", body=stream)

    page.route(f"{stack.base}/api/sse/**", first_stream_made_up)
    open_client_page(page, stack.base)
    new_client(page, "a", stack.key, FAST)
    connect(page, "a", cid)
    wait_js(page, "() => logs.a.deltas.length >= 5")
    page.wait_for_timeout(300)
    got = [(d["cause"], d["offset"], d["content"]) for d in log_of(page, "a")["deltas"]]
    # (0, 5) would have made "abXYZ", and (0, 2) after it "abcd": both dropped; cause 1 is not held up.
    assert got == [(0, 0, "ab"), (1, 0, "ok"), (0, 0, "ab😀defg"), (0, 7, "ab😀defgh"), (1, 2, "ok!")]
    assert served and page.page_errors == []
