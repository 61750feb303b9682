"""The browser client's reconnection in Chromium: refused streams close for good, backoff with jitter, connect(id, n).

Pages and helpers as in test_browser_client.py. The client reopens every stream itself (never the
EventSource's own reconnection) after asking the stream's URL with HEAD what an EventSource would get.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from .test_browser_client import log_of, new_client, open_client_page, wait_js
from .test_browser_client_faults import FAST, connect, kill_worker, read_three_notes, states


def record_sse(page: Any, base: str) -> list[tuple[str, int, bool]]:
    """(method, status, whether it had a Bearer key) of every answer to the page's requests for a stream URL."""
    seen: list[tuple[str, int, bool]] = []
    page.on("response", lambda r: r.url.startswith(f"{base}/api/sse/") and seen.append(
        (r.request.method, r.status, "authorization" in r.request.headers)))
    return seen


def sign_in(page: Any, key: str) -> None:
    """POST /api/session with `key` from the page: its session cookie alone authenticates from then on."""
    status = page.evaluate("async (key) => (await fetch('/api/session', {method: 'POST', "
                           "headers: {Authorization: 'Bearer ' + key}})).status", key)
    assert status == 200


def record_error_messages(page: Any, name: str) -> None:
    """Keep the message of each error client `name` emits in window.errorMessages[name]."""
    page.evaluate("""(name) => {
      (window.errorMessages ||= {})[name] = [];
      clients[name].on('error', (e) => errorMessages[name].push(e.error && e.error.message));
    }""", name)


def test_a_stream_refused_400_closes_bad_request_with_the_servers_error(start_web, page) -> None:
    """connect(id, -1, ['foo']): the 400 closes the client ('bad_request', the server's message); never retried."""
    stack = start_web(agent="echo")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    sse = record_sse(page, stack.base)
    sign_in(page, stack.key)
    new_client(page, "k", stack.key, FAST)  # a key: the stream's URL is asked first
    new_client(page, "c", None, FAST)  # the cookie alone: the EventSource first, then the probe
    for name in ("k", "c"):
        record_error_messages(page, name)
        page.evaluate("([name, cid]) => clients[name].connect(cid, -1, ['foo']).then(() => undefined)", [name, cid])
        wait_js(page, "(name) => logs[name].closes.length > 0", name, timeout=10)
    page.wait_for_timeout(1500)  # FAST retries within 100 ms to 1 s: none may come

    for name in ("k", "c"):
        log = log_of(page, name)
        assert log["closes"] == [{"reason": "bad_request"}]
        # The key's client asks first; the cookie's EventSource fails first, then the client waits once and asks.
        assert states(page, name) == ["connecting", "closed"] if name == "k" else \
            ["connecting", "reconnecting", "closed"], states(page, name)
        assert log["errors"][-1] == {"type": "sse", "code": "bad_request", "status": 400, "readyState": None}
        message = page.evaluate("(name) => errorMessages[name].at(-1)", name)
        assert "unknown provider type 'foo'" in message, message
    assert page.evaluate("[clients.k.state, clients.k.connected, clients.k.eventSource]") == ["closed", False, None]
    key_asks = [s for s in sse if s[2]]
    assert key_asks == [("HEAD", 400, True), ("GET", 400, True)], sse  # HEAD, then GET for the error's text
    cookie_asks = [s for s in sse if not s[2]]
    assert cookie_asks == [("GET", 400, False), ("HEAD", 400, False), ("GET", 400, False)], sse  # EventSource, probe
    assert page.page_errors == []


@pytest.mark.parametrize(("status", "code", "reason"), [
    (401, "unauthorized", "unauthorized"), (403, "forbidden", "forbidden"), (404, "not_found", "not_found")])
def test_a_stream_refused_without_the_key_closes_though_the_key_works(start_web, page, status, code, reason) -> None:
    """The stream's URL refuses the cookie (not sent, another user's) while the key works: closed, not retried."""
    stack = start_web(agent="echo")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    sse = record_sse(page, stack.base)
    body = json.dumps({"status": "error", "error": code, "message": "refused by the test"})

    def refuse_the_cookie(route: Any) -> None:
        if "authorization" in route.request.headers:
            return route.continue_()
        return route.fulfill(status=status, content_type="application/json", body=body)

    page.route(f"{stack.base}/api/sse/**", refuse_the_cookie)
    new_client(page, "a", stack.key, FAST)
    page.evaluate("(cid) => clients.a.getConversation(cid)", cid)  # a Bearer call: the client has its cookie
    page.evaluate("(cid) => clients.a.connect(cid).then(() => undefined)", cid)  # so the EventSource comes first
    wait_js(page, "() => logs.a.closes.length > 0", timeout=10)
    page.wait_for_timeout(1500)

    a = log_of(page, "a")
    assert a["closes"] == [{"reason": reason}]
    assert a["errors"][-1] == {"type": "sse", "code": code, "status": status, "readyState": None}
    # The EventSource, then the probe: the key may read the stream, the cookie alone may not.
    assert sse == [("GET", status, False), ("HEAD", 200, True), ("HEAD", status, False), ("GET", status, False)]
    assert states(page, "a")[-1] == "closed"
    assert page.page_errors == []


def test_a_stream_that_keeps_ending_backs_off_exponentially(start_web, page) -> None:
    """`retry: 0` and streams that end at once: no tight loop; each connection event does not reset the backoff."""
    stack = start_web(agent="echo")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    sse = record_sse(page, stack.base)
    opening = {"type": "connection_established", "connection_id": "x", "conversation_id": cid,
               "latest_event_id": -1, "providers_set": ["github"], "agent_state": None}
    stream = f"retry: 0\nevent: connection\ndata: {json.dumps(opening)}\n\n"

    def end_at_once(route: Any) -> None:
        if route.request.method != "GET":
            return route.continue_()
        return route.fulfill(status=200, content_type="text/event-stream", body=stream)

    page.route(f"{stack.base}/api/sse/**", end_at_once)
    page.evaluate("Math.random = () => 1")  # every backoff at its ceiling: min * 2^attempt, capped
    new_client(page, "a", stack.key, {"minRetryMs": 100, "maxRetryMs": 800})
    page.evaluate("(cid) => clients.a.connect(cid).then(() => undefined)", cid)
    page.wait_for_timeout(3500)

    a = log_of(page, "a")
    delays = [s["delayMs"] for s in a["states"] if s["state"] == "reconnecting"]
    assert 4 <= len(delays) <= 8 and delays[:5] == [100, 200, 400, 800, 800][:len(delays)], delays
    streams = [s for s in sse if s[0] == "GET"]
    assert len(streams) <= len(delays) + 1, sse  # one stream per wait: the browser never reconnects by itself
    assert len(a["connections"]) == len(streams)
    assert [s["attempt"] for s in a["states"] if s["state"] == "open"][:4] == [0, 1, 2, 3]
    assert page.page_errors == []


def test_many_tabs_reconnect_at_jittered_times_after_a_healthy_stream(start_web, page) -> None:
    """A killed worker ends 4 healthy streams: each waits its own random time in [0, minRetryMs], probes, reopens."""
    stack = start_web(agent="echo", SSE_RETRY_MS="300")
    cid = stack.api.create()
    open_client_page(page, stack.base)
    sse = record_sse(page, stack.base)
    names = ["t0", "t1", "t2", "t3"]
    for name in names:
        new_client(page, name, stack.key, {"minRetryMs": 2000, "maxRetryMs": 8000})
        connect(page, name, cid)
    stack.api.post(cid, type="note", content="delivered to every tab")
    wait_js(page, "(names) => names.every((n) => clients[n].lastEventId === 0)", names)
    kill_worker(stack)
    wait_js(page, "(names) => names.every((n) => logs[n].connections.length >= 2 && clients[n].state === 'open')",
            names, timeout=30)

    first = []
    for name in names:
        log = log_of(page, name)
        waits = [s for s in log["states"] if s["state"] == "reconnecting"]
        assert waits and waits[0]["attempt"] == 1 and isinstance(waits[0]["delayMs"], int), waits
        assert 0 <= waits[0]["delayMs"] <= 2000
        first.append(waits[0]["delayMs"])
        assert log["connections"][-1]["latest_event_id"] == 0  # resumed after what it had
        assert [e["id"] for e in log["messages"]] == [0]
    assert len(set(first)) > 1, first  # not in lockstep
    assert len([s for s in sse if s[0] == "HEAD" and s[1] == 200 and not s[2]]) >= len(names), sse
    assert page.page_errors == []


def test_connect_with_an_id_honours_it_and_without_one_resumes(start_web, page) -> None:
    """connect(sameId, -1) reads the history again; connect(sameId, 0) from event 1; connect(sameId) resumes."""
    stack, cid = read_three_notes(start_web, page, "note")
    page.evaluate("(cid) => clients.a.connect(cid, -1).then(() => undefined)", cid)
    wait_js(page, "() => logs.a.messages.length === 6")
    page.evaluate("(cid) => clients.a.connect(cid, 0).then(() => undefined)", cid)
    wait_js(page, "() => logs.a.messages.length === 8")
    page.evaluate("(cid) => clients.a.connect(cid).then(() => undefined)", cid)
    wait_js(page, "() => logs.a.connections.length === 4 && clients.a.state === 'open'")
    stack.api.post(cid, type="note", content="after")
    wait_js(page, "() => clients.a.lastEventId === 3")

    a = log_of(page, "a")
    assert [e["id"] for e in a["messages"]] == [0, 1, 2, 0, 1, 2, 1, 2, 3]
    assert [c["latest_event_id"] for c in a["connections"]] == [-1, -1, 0, 2]
    assert page.page_errors == []
