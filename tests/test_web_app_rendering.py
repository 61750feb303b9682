"""The web app in Chromium: each event type shown, markup kept as text and the headers, the list's pages, bad links."""
from __future__ import annotations

import json
from typing import Any

from .conftest import Api
from .fake_llm import FakeLLM
from .web_app_helpers import (
    WAIT_MS,
    agent_bubbles,
    assert_shows_exactly,
    llm_env,
    open_conversation,
    pump,
    settled_events,
    sign_in,
    stored_events,
    wait_agent,
    wait_connection,
)

XSS = "<img src=x onerror=window.__xss=1>"


def test_headers_and_a_message_with_markup_is_text(page, start_web) -> None:
    stack = start_web()
    response = page.goto(stack.base + "/")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"

    sign_in(page, stack)
    page.fill("#new-message", XSS)  # also the conversation's title
    page.click("#new-button")
    wait_connection(page, "open")
    page.wait_for_selector("#event-log [data-type='agent_message']", timeout=WAIT_MS)  # the echo
    assert page.text_content("#conv-title") == XSS
    # Users may post any type: an action, its observation and a reply of their own, all holding markup.
    cid = page.evaluate("() => decodeURIComponent(location.hash.slice(4))")
    action = stack.api.post(cid, type="agent_action", action=XSS, args={"path": XSS})
    stack.api.post(cid, type="observation", observation=XSS, content=XSS, action_id=action)
    stack.api.post(cid, type="agent_message", content=XSS)
    assert_shows_exactly(page, settled_events(stack, cid, 1))
    texts = page.eval_on_selector_all("#event-log .bubble-text", "ns => ns.map(n => n.textContent)")
    assert texts == [XSS, XSS, XSS]
    for summary in page.query_selector_all("#event-log details summary"):
        summary.click()
    shown = page.eval_on_selector_all("#event-log pre", "ns => ns.map(n => n.textContent)")
    assert sum(text.count(json.dumps(XSS)) for text in shown) >= 4  # action, args.path, observation, content
    assert_no_markup(page)

    page.click(".back")
    page.wait_for_selector(f"#conv-list li[data-conversation-id='{cid}']", timeout=WAIT_MS)
    assert page.text_content(f"#conv-list li[data-conversation-id='{cid}'] .conv-title") == XSS
    assert_no_markup(page)
    assert page.page_errors == []
    refused = [line for line in page.console_lines if "Content Security Policy" in line or "Refused" in line]
    assert refused == []


def assert_no_markup(page) -> None:
    """No element made from an event's markup: not one <img> in the page, no inline style.

    (The CSP alone would stop an injected script, so window.__xss cannot fail by itself.)
    """
    assert page.evaluate("() => document.querySelectorAll('img').length") == 0
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('[style]').length") == 0


def test_every_event_type_is_readable(page, start_web, fake_llm: FakeLLM) -> None:
    fake_llm.status = 500  # the agent's run fails: an error event, state error
    stack = start_web(agent="llm", **llm_env(fake_llm))
    cid = stack.api.create(initial_user_msg="hello")
    settled_events(stack, cid, 1)
    stack.api.post(cid, action="message", args={"content": "OpenHands' own form"})
    stack.api.post(cid, type="browse_custom", url="https://example.test/<b>x</b>")
    events = settled_events(stack, cid, 2)
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    assert_shows_exactly(page, events)
    wait_agent(page, "error")
    assert page.text_content("#agent-status") == "Agent error"
    errors = page.eval_on_selector_all("#event-log [data-type='error']", "ns => ns.map(n => n.textContent)")
    assert len(errors) == 2 and all(text.startswith("Error: ") for text in errors)
    users = page.eval_on_selector_all("#event-log .row-user .bubble-text", "ns => ns.map(n => n.textContent)")
    assert users == ["hello", "OpenHands' own form"]
    generic = page.query_selector("#event-log [data-type='browse_custom']")
    assert generic.query_selector("summary").text_content().startswith("›browse_custom")
    generic.query_selector("summary").click()
    shown = json.loads(generic.query_selector("pre").text_content())
    assert shown["url"] == "https://example.test/<b>x</b>" and shown["type"] == "browse_custom"
    notes = page.eval_on_selector_all("#event-log [data-type='agent_state_changed']", "ns => ns.length")
    assert notes == 4
    assert page.page_errors == []


def signed_in_with_23(page, start_web) -> tuple[Any, list[str]]:
    """A stack where alice has 23 conversations, signed in, the list's first page (20) shown; the ids, oldest first."""
    stack = start_web()
    created = [stack.api.create() for _ in range(23)]
    sign_in(page, stack)
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 20", timeout=WAIT_MS)
    return stack, created


def test_the_list_pages_newest_first(page, start_web) -> None:
    stack, created = signed_in_with_23(page, start_web)
    page.wait_for_selector("#load-more:not([hidden])", timeout=WAIT_MS)
    page.click("#load-more")
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 23", timeout=WAIT_MS)
    page.wait_for_selector("#load-more[hidden]", state="attached", timeout=WAIT_MS)
    shown = page.eval_on_selector_all("#conv-list li", "ns => ns.map(n => n.dataset.conversationId)")
    assert shown == created[::-1]

    # Open one from the list, then back: the hash route says which.
    page.click(f"#conv-list li[data-conversation-id='{created[0]}'] a")
    page.wait_for_selector("#view-conv:not([hidden])", timeout=WAIT_MS)
    assert page.evaluate("() => location.hash") == f"#/c/{created[0]}"
    wait_connection(page, "open")
    page.go_back()
    page.wait_for_selector("#view-list:not([hidden])", timeout=WAIT_MS)
    wait_connection(page, "idle")
    assert page.page_errors == []


def test_the_view_follows_new_events_unless_scrolled_up(page, start_web) -> None:
    stack = start_web()
    cid = stack.api.create(initial_user_msg="first")
    for i in range(15):
        stack.api.post(cid, type="user_message", content=f"message {i}\nwith\nseveral\nlines")
    events = settled_events(stack, cid, 16)
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    assert_shows_exactly(page, events)
    at_bottom = "() => { const l = document.querySelector('#event-log');" \
                " return l.scrollHeight - l.scrollTop - l.clientHeight < 2; }"
    page.wait_for_function(at_bottom, timeout=WAIT_MS)
    assert page.evaluate("() => document.querySelector('#event-log').scrollHeight > 2000")

    # Scrolled up: a new event does not move the view; a button offers the way down.
    page.evaluate("() => { document.querySelector('#event-log').scrollTop = 0; }")
    page.wait_for_function("() => document.querySelector('#event-log').scrollTop === 0", timeout=WAIT_MS)
    stack.api.post(cid, type="user_message", content="while you read")
    page.wait_for_selector("#jump:not([hidden])", timeout=WAIT_MS)
    assert page.evaluate("() => document.querySelector('#event-log').scrollTop") == 0
    page.click("#jump")
    page.wait_for_function(at_bottom, timeout=WAIT_MS)
    page.wait_for_selector("#jump[hidden]", state="attached", timeout=WAIT_MS)

    # At the bottom again: the answers keep it there.
    events = settled_events(stack, cid, 17)
    stack.api.post(cid, type="user_message", content="and one more")
    events = settled_events(stack, cid, 18)
    assert_shows_exactly(page, events)
    page.wait_for_function(at_bottom, timeout=WAIT_MS)
    assert page.page_errors == []


def test_a_conversation_that_is_gone(page, start_web) -> None:
    stack = start_web()
    cid = stack.api.create(initial_user_msg="alice's")
    bobs = Api(stack.base, stack.make_key("bob")).create(initial_user_msg="bob's")
    sign_in(page, stack)
    for missing in ("no-such-conversation", bobs):  # bob's is not alice's: the same 404
        page.goto(f"{stack.base}/#/c/{missing}")
        page.wait_for_selector("#view-list:not([hidden])", timeout=WAIT_MS)
        page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
        assert "does not exist" in page.text_content("#notice")
        assert "bob's" not in page.content()

    # Open, then deleted elsewhere: the view says so and goes back to the list.
    open_conversation(page, stack, cid)
    assert stack.api.call("DELETE", f"/api/conversations/{cid}")[0] == 200
    page.wait_for_selector("#view-list:not([hidden])", timeout=WAIT_MS)
    page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
    assert "does not exist" in page.text_content("#notice")
    page.wait_for_selector("#list-empty:not([hidden])", timeout=WAIT_MS)
    assert page.page_errors == []


def test_only_the_agent_speaks_as_the_agent(page, start_web) -> None:
    stack = start_web()
    cid = stack.api.create(initial_user_msg="hello")
    settled_events(stack, cid, 1)
    # A user may post events of the agent's types: they are the user's, and change no agent state.
    stack.api.post(cid, type="agent_message", content="posted by the user")
    stack.api.post(cid, type="agent_state_changed", agent_state="error")
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    assert_shows_exactly(page, stored_events(stack, cid))
    wait_agent(page, "awaiting_user_input")
    assert agent_bubbles(page) == ["hello"]
    users = page.eval_on_selector_all("#event-log .row-user .bubble-text", "ns => ns.map(n => n.textContent)")
    assert users == ["hello", "posted by the user"]
    assert page.query_selector("#event-log .row-generic[data-type='agent_state_changed']") is not None

    posted = stack.api.post(cid, type="agent_state_changed", agent_state="running")  # live too
    page.wait_for_selector(f"#event-log [data-event-id='{posted}']", timeout=WAIT_MS)
    assert page.get_attribute("#agent-status", "data-state") == "awaiting_user_input"
    assert page.is_hidden("#stop")
    assert page.page_errors == []


def sse_frames(*frames: tuple[str | None, dict]) -> str:
    """An SSE body: each (event name or None for a stored event, data)."""
    out = ["retry: 600000\n"]
    for name, data in frames:
        head = f"event: {name}\n" if name else f"id: {data['id']}\n"
        out.append(f"{head}data: {json.dumps(data)}\n\n")
    return "".join(out)


def test_a_second_reply_in_the_same_run_streams_too(page, start_web) -> None:
    # The runtime allows several agent_message per run, each grown from deltas starting at offset 0.
    stack = start_web()
    cid = stack.api.create(initial_user_msg="two replies, please")
    settled_events(stack, cid, 1)
    when = "2025-01-01T00:00:00Z"
    body = sse_frames(
        ("connection", {"type": "connection_established", "connection_id": "c", "conversation_id": cid,
                        "latest_event_id": -1, "providers_set": ["github"], "agent_state": "running"}),
        (None, {"id": 0, "type": "user_message", "source": "user", "content": "two replies, please",
                "timestamp": when}),
        (None, {"id": 1, "type": "agent_state_changed", "source": "agent", "agent_state": "running", "cause": 0,
                "timestamp": when}),
        ("agent_message_delta", {"cause": 0, "offset": 0, "text": "Fir"}),
        ("agent_message_delta", {"cause": 0, "offset": 3, "text": "st"}),
        (None, {"id": 2, "type": "agent_message", "source": "agent", "content": "First", "cause": 0,
                "timestamp": when}),
        ("agent_message_delta", {"cause": 0, "offset": 3, "text": "st"}),  # a late bit of the first: dropped
        ("agent_message_delta", {"cause": 0, "offset": 0, "text": "Sec"}),  # the second reply starts
        (None, {"id": 3, "type": "agent_message", "source": "user", "content": "not the agent's",
                "timestamp": when}),
        ("agent_message_delta", {"cause": 0, "offset": 3, "text": "ond"}),
    )
    page.route("**/api/sse/**", lambda route: route.fulfill(status=200, body=body, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}))
    sign_in(page, stack)
    page.goto(f"{stack.base}/#/c/{cid}")
    page.wait_for_function("() => { const b = document.querySelector('.row-streaming .bubble-text');"
                           " return b && b.textContent === 'Second'; }", timeout=WAIT_MS)
    assert agent_bubbles(page) == ["First"]
    users = page.eval_on_selector_all("#event-log .row-user .bubble-text", "ns => ns.map(n => n.textContent)")
    assert users == ["two replies, please", "not the agent's"]
    assert page.eval_on_selector_all("#event-log .row-streaming", "ns => ns.length") == 1
    assert page.query_selector(".row-interrupted") is None
    assert page.get_attribute("#agent-status", "data-state") == "running"
    assert page.page_errors == []


def test_a_link_that_names_no_conversation(page, start_web) -> None:
    stack = start_web()
    stack.api.create(initial_user_msg="still listed")
    sign_in(page, stack)
    for bad in ("%E0", "a%2Fb", "x" * 65, "%3Cb%3E"):
        page.evaluate("() => { document.querySelector('#notice').hidden = true; }")
        page.goto(f"{stack.base}/#/c/{bad}")
        page.wait_for_function("() => location.hash === '#/'", timeout=WAIT_MS)
        page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
        assert "not a link to a conversation" in page.text_content("#notice")
        page.wait_for_selector("#view-list:not([hidden]) #conv-list li", timeout=WAIT_MS)
    page.goto("about:blank")
    page.goto(f"{stack.base}/#/c/%E0")  # as the first route of a page too
    page.wait_for_selector("#view-list:not([hidden]) #conv-list li", timeout=WAIT_MS)
    assert "not a link to a conversation" in page.text_content("#notice")
    assert page.page_errors == []


def test_a_refresh_while_loading_more_wins(page, start_web) -> None:
    stack, created = signed_in_with_23(page, start_web)
    held = []  # page 2's request, held while the list is refreshed
    page.route("**/api/conversations?*page_id=*", lambda route: route.continue_() if held else held.append(route))
    page.click("#load-more")
    pump(page, lambda: held, "page 2's request")
    page.evaluate("() => { location.hash = location.hash === '#/' ? '' : '#/'; }")  # a route change refreshes
    page.wait_for_selector("#load-more:not([hidden]):not([disabled])", timeout=WAIT_MS)
    with page.expect_response(lambda response: "page_id=" in response.url):
        held[0].continue_()  # the old page 2 lands after the refresh: it is dropped
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 20", timeout=WAIT_MS)
    page.click("#load-more")
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 23", timeout=WAIT_MS)
    shown = page.eval_on_selector_all("#conv-list li", "ns => ns.map(n => n.dataset.conversationId)")
    assert shown == created[::-1]
    assert page.page_errors == []
