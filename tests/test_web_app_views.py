"""The web app's views in Chromium: axe-core, keyboard only, phone and desktop pictures, a worker killed mid-reply."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from app.agent.readme import make_sample_repository

from .fake_llm import FakeLLM
from .servers import ROOT
from .web_app_helpers import (
    WAIT_MS,
    agent_bubbles,
    assert_shows_exactly,
    axe_violations,
    llm_env,
    open_conversation,
    record_connection_states,
    settled_events,
    sign_in,
    tab_to,
    wait_agent,
    wait_connection,
)

DOCS = ROOT / "docs"
SAMPLE_QUESTION = "Check whether there is any incorrect information in the README.md file"


def readme_conversation(stack, tmp_path: Path) -> tuple[str, list[dict]]:
    """A conversation the readme agent answered (actions, observations, a reply), plus a follow-up; its events."""
    make_sample_repository(tmp_path / "workspace")  # start_web's AGENT_WORKSPACE
    cid = stack.api.create(initial_user_msg=SAMPLE_QUESTION, repository="sample/hello")
    settled_events(stack, cid, 1)
    stack.api.post(cid, type="user_message", content="Thanks! Which one should I fix first?")
    return cid, settled_events(stack, cid, 2)


def assert_no_serious_violations(page, axe_source: str, where: str) -> None:
    """axe-core finds nothing serious or critical on the page as it is."""
    violations = axe_violations(page, axe_source)
    assert violations == [], f"{where}: {violations}"


def test_axe_finds_nothing_serious(page, start_web, axe_source: str, tmp_path: Path) -> None:
    stack = start_web()
    cid, events = readme_conversation(stack, tmp_path)
    page.goto(stack.base + "/")
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    assert_no_serious_violations(page, axe_source, "sign-in")
    page.fill("#api-key", "not-a-key")
    page.click("#signin-button")
    page.wait_for_selector("#signin-error:not([hidden])", timeout=WAIT_MS)
    assert_no_serious_violations(page, axe_source, "sign-in with an error")

    sign_in(page, stack)
    page.wait_for_selector("#conv-list li", timeout=WAIT_MS)
    assert_no_serious_violations(page, axe_source, "list")

    open_conversation(page, stack, cid)
    assert_shows_exactly(page, events)
    for summary in page.query_selector_all("#event-log details summary")[:3]:
        summary.click()  # expanded rows too
    assert_no_serious_violations(page, axe_source, "conversation")
    page.click("#conv-delete")
    page.wait_for_selector("#confirm-delete[open]", timeout=WAIT_MS)
    assert_no_serious_violations(page, axe_source, "delete confirmation")
    page.keyboard.press("Escape")  # a "no": nothing is deleted
    page.wait_for_selector("#confirm-delete:not([open])", state="attached", timeout=WAIT_MS)
    assert stack.api.call("GET", f"/api/conversations/{cid}")[0] == 200
    assert page.page_errors == []


def test_keyboard_only(page, start_web) -> None:
    stack = start_web()
    cid = stack.api.create(initial_user_msg="made for the keyboard test")
    page.goto(stack.base + "/")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'api-key'",
                           timeout=WAIT_MS)  # sign-in puts the focus in the key field
    page.keyboard.type(stack.key)
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#conv-list li[data-conversation-id='{cid}']", timeout=WAIT_MS)

    tab_to(page, f"#conv-list li[data-conversation-id='{cid}'] a")
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # the focus is visible
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-conv:not([hidden])", timeout=WAIT_MS)
    wait_connection(page, "open")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'message'",
                           timeout=WAIT_MS)
    page.keyboard.type("typed, never clicked")
    page.keyboard.press("Enter")
    page.wait_for_function("() => [...document.querySelectorAll('#event-log [data-type=agent_message]')]"
                           ".some(n => n.textContent.includes('typed, never clicked'))", timeout=WAIT_MS)

    # Back to the list and start one, keyboard only.
    tab_to(page, ".back", key="Shift+Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-list:not([hidden])", timeout=WAIT_MS)
    tab_to(page, "#new-message")
    page.keyboard.type("a new one")
    tab_to(page, "#new-button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-conv:not([hidden])", timeout=WAIT_MS)
    page.wait_for_selector("#event-log [data-type='agent_message']", timeout=WAIT_MS)
    assert page.page_errors == []


def png_size(path: Path) -> tuple[int, int]:
    """A PNG's width and height (from its IHDR chunk), after checking it is one."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_phone_and_desktop_screenshots(page, start_web, tmp_path: Path) -> None:
    """The pictures of README.md (docs/web-app-desktop.png, docs/web-app-phone.png).

    They are written to a temporary directory, so a run leaves the tree clean (they show times);
    with UPDATE_SCREENSHOTS=1 they are written to docs/ instead: `UPDATE_SCREENSHOTS=1 pytest -k screenshots`.
    """
    shots = DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / "screenshots"
    stack = start_web()
    cid, events = readme_conversation(stack, tmp_path)
    sign_in(page, stack)
    open_conversation(page, stack, cid)
    assert_shows_exactly(page, events)
    # The picture: the end of the first reply, the follow-up, and the second run's steps, one of them open.
    follow_up = [e for e in events if e.get("type") == "user_message"][1]
    listing = next(e for e in events if e.get("action") == "list" and e["id"] > follow_up["id"])
    page.click(f"#event-log [data-event-id='{listing['id']}'] summary")
    page.evaluate("() => document.activeElement.blur()")
    shots.mkdir(exist_ok=True)
    for name, width, height in (("desktop", 1280, 800), ("phone", 375, 740)):
        page.set_viewport_size({"width": width, "height": height})
        page.evaluate("id => { const log = document.querySelector('#event-log');"
                      " const row = log.querySelector(`[data-event-id='${id}']`);"
                      " log.scrollTop = row.offsetTop - log.offsetTop - log.clientHeight / 3; }", follow_up["id"])
        shot = shots / f"web-app-{name}.png"
        shot.unlink(missing_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        assert png_size(shot) == (width, height)
    # At phone width nothing scrolls sideways: not the conversation, the list or the sign-in.
    assert no_horizontal_scroll(page), "conversation"
    page.click(".back")
    page.wait_for_selector("#conv-list li", timeout=WAIT_MS)
    assert no_horizontal_scroll(page), "list"
    page.click("#sign-out")
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    assert no_horizontal_scroll(page), "sign-in"
    assert page.page_errors == []


def no_horizontal_scroll(page) -> bool:
    """Whether the page and every scrolling part of it are no wider than the viewport."""
    return page.evaluate("""() => {
        const wide = (n) => n.scrollWidth > n.clientWidth + 1;
        const root = document.scrollingElement;
        const boxes = [...document.querySelectorAll('main, .view, #event-log')].filter((n) => !n.closest('[hidden]'));
        return !wide(root) && root.scrollWidth <= window.innerWidth && !boxes.some(wide);
    }""")


def test_a_killed_worker_mid_reply(page, start_web, fake_llm: FakeLLM) -> None:
    # The reply (about 1.5 s) ends while the page waits out the stream's retry delay (3 s): on reopen the
    # connection event already says the run is over, then the missed reply is replayed. It is shown once,
    # as the stored reply, never also as a "stopped" partial one.
    fake_llm.chunks = [f"bit{i} " for i in range(30)]
    fake_llm.delay = 0.05
    stack = start_web(agent="llm", workers=1, **llm_env(fake_llm))
    sign_in(page, stack)
    cid = stack.api.create(initial_user_msg="a short answer, please")
    open_conversation(page, stack, cid)
    page.wait_for_selector(".row-streaming .bubble-text:not(:empty)", timeout=WAIT_MS)
    record_connection_states(page)

    (worker,) = stack.gunicorn.worker_pids()
    os.kill(worker, signal.SIGKILL)  # the worker serving the stream dies mid-answer
    page.wait_for_function("() => window.__connStates.includes('reconnecting')", timeout=WAIT_MS)
    events = settled_events(stack, cid, 1)  # answered while the page was away
    wait_connection(page, "open")  # by itself: a new worker took the reconnecting stream
    states = page.evaluate("() => window.__connStates")
    assert states.index("reconnecting") < len(states) - 1 and states[-1] == "open", states

    wait_agent(page, "awaiting_user_input")
    assert_shows_exactly(page, events)
    stored = [e["content"] for e in events if e.get("type") == "agent_message"]
    assert stored == ["".join(fake_llm.chunks)]
    assert agent_bubbles(page) == stored  # one bubble per answered message, as REST has them
    assert page.eval_on_selector_all("#event-log .row-agent", "ns => ns.length") == 1
    assert page.query_selector(".row-interrupted") is None
    assert page.query_selector(".row-streaming") is None
    assert page.page_errors == []
