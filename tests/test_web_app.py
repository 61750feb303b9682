"""The web app at / in Chromium: sign in, list, a live conversation, Stop, reload, delete, sign out; sending.

How events and lists are shown, markup, bad links: test_web_app_rendering.py; the views: test_web_app_views.py.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

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


def test_the_whole_flow(page, start_web, fake_llm: FakeLLM) -> None:
    fake_llm.chunks = [f"word{i} " for i in range(30)]
    fake_llm.delay = 0.05
    stack = start_web(agent="llm", **llm_env(fake_llm))

    # Sign in: the cookie is set; the key is nowhere on the page, in storage or in a URL. Its field has no
    # name and its form posts (were it ever submitted natively, the key would not go into a query string).
    streams: list[str] = []
    page.on("request", lambda request: "/api/sse/" in request.url and streams.append(request.url))
    sign_in(page, stack)
    assert page.get_attribute("#api-key", "name") is None
    assert page.get_attribute("#api-key", "type") == "password"
    assert page.eval_on_selector("#signin-form", "form => form.method") == "post"
    assert stack.key not in page.url
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
    assert [url for url in streams if cid in url] == [streams[0]]  # made by a POST: one stream, the view's
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
    fake_llm.chunks = [f"long{i} " for i in range(400)]
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


def user_messages(stack, cid: str) -> list[str]:
    """The texts of the conversation's stored user messages."""
    return [e["content"] for e in stored_events(stack, cid) if e.get("type") == "user_message"]


def open_after_one_answer(page, start_web) -> tuple[Any, str]:
    """Alice signed in, her conversation open, its first message ("first") answered; the stack and its id."""
    stack = start_web()
    cid = stack.api.create(initial_user_msg="first")
    settled_events(stack, cid, 1)
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    return stack, cid


def test_enter_twice_while_sending_posts_once(page, start_web) -> None:
    stack, cid = open_after_one_answer(page, start_web)
    held = []  # the POSTs of the page, held until the test lets them go
    page.route("**/api/conversations/*/events", lambda route: held.append(route) if route.request.method == "POST"
               else route.continue_())
    page.fill("#message", "only once")
    page.keyboard.press("Enter")
    pump(page, lambda: held, "the POST")
    page.keyboard.press("Enter")  # while the first is in flight (the Send button is disabled, Enter is not)
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)  # a second POST would be made at once
    assert len(held) == 1
    held[0].continue_()
    page.wait_for_function("() => document.querySelector('#message').value === ''", timeout=WAIT_MS)
    settled_events(stack, cid, 2)
    assert user_messages(stack, cid) == ["first", "only once"]
    assert page.page_errors == []


def test_sending_again_after_a_lost_answer_stores_it_once(page, start_web) -> None:
    stack, cid = open_after_one_answer(page, start_web)
    keys = []
    lose = [True]

    def post(route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        keys.append(route.request.headers.get("idempotency-key"))
        if lose[0]:
            route.fetch()  # the server stores it; the page never hears the answer
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/conversations/*/events", post)
    page.fill("#message", "landed, though it seemed not to")
    page.click("#send")
    page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)  # the client's retries all failed
    assert "not sent" in page.text_content("#notice")
    assert page.input_value("#message") == "landed, though it seemed not to"
    lose[0] = False
    page.click("#send")  # the user tries again: the same action, the same key
    page.wait_for_function("() => document.querySelector('#message').value === ''", timeout=WAIT_MS)
    assert len(set(keys)) == 1 and len(keys) > 1, keys
    settled_events(stack, cid, 2)
    assert user_messages(stack, cid) == ["first", "landed, though it seemed not to"]

    page.fill("#message", "a new text")  # another message: another key
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#message').value === ''", timeout=WAIT_MS)
    assert keys[-1] != keys[0]
    assert page.page_errors == []


def test_a_session_that_ended_while_sending(page, start_web) -> None:
    stack = start_web()
    cid = stack.api.create(initial_user_msg="hi")
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    page.context.clear_cookies()  # the session is gone (the open stream goes on until it reconnects)
    page.fill("#message", "after the end")
    page.click("#send")
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    assert "sign in again" in page.text_content("#notice")
    assert page.query_selector("#event-log [data-event-id]") is None
    assert page.page_errors == []


@pytest.mark.parametrize(("status", "said"), [(403, "not allowed"), (400, "bad request")])
def test_a_stream_refused_for_good_says_so(page, start_web, status: int, said: str) -> None:
    # The client closes for good with 'forbidden' / 'bad_request' (not retried): the page says it.
    stack = start_web()
    cid = stack.api.create(initial_user_msg="hi")
    sign_in(page, stack)
    page.route("**/api/sse/**", lambda route: route.fulfill(status=status, content_type="application/json",
                                                            body=json.dumps({"error": "x", "message": "refused"})))
    page.goto(f"{stack.base}/#/c/{cid}")
    wait_connection(page, "closed")
    page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
    assert said in page.text_content("#notice")
    assert page.is_visible("#view-conv")
    assert page.page_errors == []
