"""The web app at / in Chromium: sign in, list, a live conversation, Stop, reload, delete, sign out; safety."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .conftest import Api
from .fake_llm import FakeLLM
from .web_app_helpers import (
    WAIT_MS,
    agent_bubbles,
    assert_shows_exactly,
    llm_env,
    open_conversation,
    settled_events,
    sign_in,
    wait_agent,
    wait_connection,
)

XSS = "<img src=x onerror=window.__xss=1>"


@pytest.fixture()
def fake() -> Iterator[FakeLLM]:
    """A fake chat-completions server whose replies come in many slow bits."""
    server = FakeLLM(key="test-key").start()
    yield server
    server.stop()


def test_the_whole_flow(page, start_web, fake: FakeLLM) -> None:
    fake.chunks = [f"word{i} " for i in range(30)]
    fake.delay = 0.05
    stack = start_web(agent="llm", **llm_env(fake))

    # Sign in: the cookie is set; the key is nowhere on the page or in storage.
    sign_in(page, stack)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["oh_session"]["httpOnly"]
    assert page.input_value("#api-key") == ""
    assert stack.key not in page.content()
    storage = page.evaluate("() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert stack.key not in storage
    page.wait_for_selector("#list-empty:not([hidden])", timeout=WAIT_MS)

    # A new conversation from the form; its first message is answered, growing from deltas first.
    page.fill("#new-message", "First question\nwith a second line")
    page.click("#new-button")
    page.wait_for_function("() => /^#\\/c\\/.+/.test(location.hash)", timeout=WAIT_MS)
    cid = page.evaluate("() => decodeURIComponent(location.hash.slice(4))")
    wait_connection(page, "open")
    assert page.text_content("#event-log [data-type='user_message'] .bubble-text") == \
        "First question\nwith a second line"
    assert_reply_grows(page, 1)

    # Two more through the message box (Enter sends; Shift+Enter is a new line).
    page.fill("#message", "")
    page.type("#message", "Second")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#event-log [data-type=user_message]').length === 2",
                           timeout=WAIT_MS)
    assert page.input_value("#message") == ""
    assert page.eval_on_selector_all("#event-log [data-type=user_message] .bubble-text",
                                     "ns => ns.map(n => n.textContent)")[1] == "Second\nline two"
    assert_reply_grows(page, 2)

    # The third gets a long answer: Stop while it streams.
    fake.chunks = [f"long{i} " for i in range(400)]
    page.fill("#message", "Third, a long one")
    page.click("#send")
    page.wait_for_selector(".row-streaming .bubble-text:not(:empty)", timeout=WAIT_MS)
    wait_agent(page, "running")
    page.click("#stop")
    wait_agent(page, "stopped")
    page.wait_for_selector("#stop[hidden]", state="attached", timeout=WAIT_MS)
    page.wait_for_selector(".row-interrupted", timeout=WAIT_MS)
    events = settled_events(stack, cid, 3)
    assert [e["agent_state"] for e in events if e["type"] == "agent_state_changed"][-1] == "stopped"
    assert_shows_exactly(page, events)

    # Reload: the same history, each event once, then live again.
    page.reload()
    wait_connection(page, "open")
    assert_shows_exactly(page, events)
    assert page.text_content("#agent-status") == "Agent stopped"
    assert len(agent_bubbles(page)) == 2

    # Delete it from the list (after the confirmation); it leaves the list and the API.
    page.click(".back")
    item = f"#conv-list li[data-conversation-id='{cid}']"
    page.wait_for_selector(item, timeout=WAIT_MS)
    page.click(f"{item} button")
    page.wait_for_selector("#confirm-delete[open]", timeout=WAIT_MS)
    page.click("#confirm-ok")
    page.wait_for_selector(item, state="detached", timeout=WAIT_MS)
    assert stack.api.call("GET", f"/api/conversations/{cid}")[0] == 404

    # Sign out: the cookie is gone, the API says 401, sign-in is shown.
    page.click("#sign-out")
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'api-key'",
                           timeout=WAIT_MS)
    assert "oh_session" not in {c["name"] for c in page.context.cookies()}
    assert page.evaluate("async () => (await fetch('/api/conversations')).status") == 401
    page.reload()
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    assert page.page_errors == []


def assert_reply_grows(page, answered: int) -> None:
    """The reply bubble grows from deltas, then the stored message (the `answered`-th) replaces it."""
    page.wait_for_selector(".row-streaming .bubble-text:not(:empty)", timeout=WAIT_MS)
    first = page.text_content(".row-streaming .bubble-text")
    assert len(agent_bubbles(page)) == answered - 1  # nothing stored yet: this is the live reply
    page.wait_for_function("n => { const b = document.querySelector('.row-streaming .bubble-text');"
                           " return b && b.textContent.length > n; }", arg=len(first), timeout=WAIT_MS)
    page.wait_for_function("n => document.querySelectorAll('#event-log [data-type=agent_message]').length === n",
                           arg=answered, timeout=WAIT_MS)
    assert page.query_selector(".row-streaming") is None
    assert agent_bubbles(page)[-1].startswith("word0 word1 ")


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
    page.fill("#new-message", XSS)
    page.click("#new-button")
    wait_connection(page, "open")
    page.wait_for_selector("#event-log [data-type='agent_message']", timeout=WAIT_MS)  # the echo
    texts = page.eval_on_selector_all("#event-log .bubble-text", "ns => ns.map(n => n.textContent)")
    assert texts == [XSS, XSS]
    assert page.query_selector("#event-log img") is None
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('[style]').length") == 0
    assert page.page_errors == []
    refused = [line for line in page.console_lines if "Content Security Policy" in line or "Refused" in line]
    assert refused == []


def test_every_event_type_is_readable(page, start_web, fake: FakeLLM) -> None:
    fake.status = 500  # the agent's run fails: an error event, state error
    stack = start_web(agent="llm", **llm_env(fake))
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


def test_the_list_pages_newest_first(page, start_web) -> None:
    stack = start_web()
    created = [stack.api.create() for _ in range(23)]
    sign_in(page, stack)
    page.wait_for_function("() => document.querySelectorAll('#conv-list li').length === 20", timeout=WAIT_MS)
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
