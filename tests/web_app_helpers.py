"""Helpers for the web app's browser tests: signing in, reading what the page shows, waiting on it."""
from __future__ import annotations

import time
from typing import Any

from .fake_llm import FakeLLM

WAIT_MS = 20_000  # what any one wait on the page may take; every wait is for a condition

# The ids of the stored events on the page, in document order (observations sit inside their action).
RENDERED_IDS = "() => [...document.querySelectorAll('#event-log [data-event-id]')].map(n => Number(n.dataset.eventId))"
# Top-level rows only: these are in id order.
ROW_IDS = "() => [...document.querySelectorAll('#event-log > [data-event-id]')].map(n => Number(n.dataset.eventId))"


def llm_env(fake: FakeLLM) -> dict[str, str]:
    """The settings that point the llm agent at the fake server."""
    return {"AGENT_LLM_BASE_URL": fake.url, "AGENT_LLM_MODEL": "fake", "AGENT_LLM_API_KEY": "test-key"}


def sign_in(page: Any, stack: Any) -> None:
    """Open / and sign in with alice's key; wait for the list view."""
    page.goto(stack.base + "/")
    page.wait_for_selector("#view-signin:not([hidden])", timeout=WAIT_MS)
    page.fill("#api-key", stack.key)
    page.click("#signin-button")
    page.wait_for_selector("#view-list:not([hidden])", timeout=WAIT_MS)


def open_conversation(page: Any, stack: Any, cid: str) -> None:
    """Go to a conversation's route and wait until its stream is open."""
    page.goto(f"{stack.base}/#/c/{cid}")
    page.wait_for_selector("#view-conv:not([hidden])", timeout=WAIT_MS)
    wait_connection(page, "open")


def wait_connection(page: Any, state: str) -> None:
    """Wait until the header's connection indicator shows `state`."""
    page.wait_for_selector(f"#conn-status[data-state='{state}']", timeout=WAIT_MS)


def wait_agent(page: Any, state: str) -> None:
    """Wait until the header's agent indicator shows `state`."""
    page.wait_for_selector(f"#agent-status[data-state='{state}']:not([hidden])", timeout=WAIT_MS)


def stored_events(stack: Any, cid: str) -> list[dict[str, Any]]:
    """The conversation's events as the REST listing has them."""
    status, body, _ = stack.api.call("GET", f"/api/conversations/{cid}/events?start_id=0&limit=1000")
    assert status == 200, body
    assert not body["has_more"]
    return body["events"]


def settled_events(stack: Any, cid: str, answers: int) -> list[dict[str, Any]]:
    """Wait until `answers` runs have ended (their final agent_state_changed is stored); the events."""
    from .servers import wait_until

    def ended() -> list[dict[str, Any]] | None:
        events = stored_events(stack, cid)
        finished = [e for e in events if e.get("type") == "agent_state_changed" and e["agent_state"] != "running"]
        return events if len(finished) >= answers else None

    return wait_until(ended, WAIT_MS / 1000, what=f"{answers} finished runs")


def wait_rendered(page: Any, count: int) -> None:
    """Wait until the page shows `count` stored events."""
    page.wait_for_function(f"n => ({RENDERED_IDS})().length >= n", arg=count, timeout=WAIT_MS)


def assert_shows_exactly(page: Any, events: list[dict[str, Any]]) -> None:
    """The page shows each stored event once, the rows in id order, nothing more."""
    wait_rendered(page, len(events))
    ids = page.evaluate(RENDERED_IDS)
    assert sorted(ids) == [e["id"] for e in events], ids
    assert len(ids) == len(set(ids))
    rows = page.evaluate(ROW_IDS)
    assert rows == sorted(rows)


def agent_bubbles(page: Any) -> list[str]:
    """The texts of the stored agent messages on the page (the agent's own: not one a user posted)."""
    return page.eval_on_selector_all("#event-log .row-agent[data-type='agent_message'] .bubble-text",
                                     "nodes => nodes.map(n => n.textContent)")


def record_connection_states(page: Any) -> None:
    """From now on, keep every state the connection indicator shows in window.__connStates."""
    page.evaluate("""() => {
        const pill = document.querySelector('#conn-status');
        window.__connStates = [pill.dataset.state];
        new MutationObserver(() => window.__connStates.push(pill.dataset.state))
            .observe(pill, {attributes: true, attributeFilter: ['data-state']});
    }""")


def tab_to(page: Any, selector: str, presses: int = 40, key: str = "Tab") -> None:
    """Press Tab (or `key`: Shift+Tab) until the focus is on an element matching `selector`."""
    for _ in range(presses):
        page.keyboard.press(key)
        if page.evaluate("s => document.activeElement && document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


def axe_violations(page: Any, axe_source: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(axe_source)
    result = page.evaluate("async () => (await axe.run(document)).violations.map(v => ({id: v.id, impact: v.impact,"
                           " help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))")
    return [v for v in result if v["impact"] in ("serious", "critical")]


def pump(page, condition, what: str) -> None:
    """Let Playwright deliver its events (route handlers run meanwhile) until `condition()` holds."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(20)
