"""The agent runtime against real Redis and real worker processes: answered at least once, never twice, in order."""
from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from app.keys import AGENT_GROUP, agent_shard, agent_work_key

from .agent_workers import AgentWorker
from .conftest import Api, bearer
from .servers import wait_until
from .sse_client import open_stream


@pytest.fixture()
def agents(redis_server, redis_client, tmp_path: Path):
    """Start agent workers (tests.agents:ScriptedAgent unless told) on the tests' Redis; all stopped after."""
    started: list[AgentWorker] = []

    def start(**options) -> AgentWorker:
        worker = AgentWorker(redis_server.url, tmp_path / f"agent-{len(started)}.log",
                             TEST_AGENT_LOG=str(tmp_path / "agent-notes.log"), **options)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture()
def store(app):
    """The app's store (conversations made and messages posted straight through it, as the API does)."""
    return app.extensions["store"]


def create(store, message: str | None = None, **fields) -> str:
    """A conversation of alice's, with `message` as event 0."""
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository=fields.get("repository"), branch=None, title="t",
                              initial_user_msg=message)
    return cid


def post(store, cid: str, content: str) -> int:
    """A user message, queued for the agents as the API queues it; its id."""
    return store.append_event("alice", cid, {"type": "user_message", "content": content}, source="user",
                              agent_kind="message")[0]


def post_stop(store, cid: str) -> int:
    """The stop button; its event id."""
    return store.append_event("alice", cid, {"type": "stop"}, source="user", agent_kind="stop")[0]


def events(store, cid: str) -> list[dict]:
    """Every stored event of the conversation."""
    out, start = [], 0
    while True:
        page, more = store.list_events("alice", cid, start, 1000)
        out += [json.loads(e) for e in page]
        if not more:
            return out
        start = out[-1]["id"] + 1


def states(store, cid: str, cause: int) -> list[str]:
    """The agent states a run went through."""
    return [e["agent_state"] for e in events(store, cid)
            if e.get("cause") == cause and e["type"] == "agent_state_changed"]


def answered(store, cid: str, cause: int, state: str = "awaiting_user_input", timeout: float = 15) -> list[dict]:
    """Wait until the run answering `cause` ended in `state`; its events."""
    wait_until(lambda: state in states(store, cid, cause), timeout, what=f"message {cause} answered ({state})")
    return [e for e in events(store, cid) if e.get("cause") == cause]


def assert_one_run(run: list[dict], consecutive: bool = True) -> None:
    """One run: running first, its end last, every event agent's or environment's, in increasing ids.

    `consecutive`: and nothing between them (no user posted meanwhile): no second copy of any step
    can hide anywhere in the run.
    """
    kinds = [(e["type"], e.get("agent_state")) for e in run]
    assert kinds[0] == ("agent_state_changed", "running")
    assert kinds[-1][0] == "agent_state_changed" and kinds[-1][1] != "running"
    assert sum(1 for k in kinds if k[0] == "agent_state_changed") == 2
    ids = [e["id"] for e in run]
    assert ids == (list(range(ids[0], ids[0] + len(run))) if consecutive else sorted(set(ids)))
    assert all(e["source"] in ("agent", "environment") for e in run)


def notes(tmp_path: Path) -> list[list[str]]:
    """What the scripted agent noted: [conversation, message id, what, time]."""
    path = tmp_path / "agent-notes.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


# Answers -------------------------------------------------------------------------------------


def test_each_message_is_answered_in_order_with_cause_and_states(agents, store):
    agents()
    cid = create(store, "first")
    second = post(store, cid, "second")
    first_run = answered(store, cid, 0)
    assert_one_run(first_run, consecutive=False)  # the second message may land inside it
    message = [e for e in first_run if e["type"] == "agent_message"]
    assert [m["content"] for m in message] == ["first"] and message[0]["history"] == 1
    second_run = answered(store, cid, second)
    assert_one_run(second_run)
    assert second_run[0]["id"] > first_run[-1]["id"]  # one run at a time, in order
    assert store.get_conversation("alice", cid)["agent_state"] == "awaiting_user_input"


def test_messages_posted_while_the_agent_is_busy_are_queued_and_answered_in_order(agents, store):
    agents()
    cid = create(store, "steps 2 0.2")
    queued = [post(store, cid, f"queued {n}") for n in range(5)]
    wait_until(lambda: all("awaiting_user_input" in states(store, cid, c) for c in queued), 20, what="every answer")
    runs = [[e for e in events(store, cid) if e.get("cause") == cause] for cause in (0, *queued)]
    for run in runs:
        assert_one_run(run, consecutive=False)  # the posts land inside the first run: that is the point
    # Six messages, a run of 2 steps (7 events) and five echoes (3 each): no event twice anywhere.
    assert len(events(store, cid)) == 6 + 7 + 5 * 3
    assert [run[0]["id"] for run in runs] == sorted(run[0]["id"] for run in runs)  # answered in posted order
    assert [next(e["content"] for e in run if e["type"] == "agent_message") for run in runs[1:]] == \
        [f"queued {n}" for n in range(5)]


def test_actions_that_are_not_messages_start_no_run_and_reach_the_agent_in_the_history(agents, store):
    agents()
    cid = create(store)
    store.append_event("alice", cid, {"type": "note", "text": "x"}, source="user", agent_kind="")
    ask = post(store, cid, "hello")
    run = answered(store, cid, ask)
    assert next(e for e in run if e["type"] == "agent_message")["history"] == 2
    assert {e.get("cause") for e in events(store, cid)} == {None, ask}


def test_observations_carry_the_id_of_their_action(agents, store):
    agents()
    cid = create(store, "steps 2 0")
    run = answered(store, cid, 0)
    actions = [e for e in run if e["type"] == "agent_action"]
    observations = [e for e in run if e["type"] == "observation"]
    assert [o["action_id"] for o in observations] == [a["id"] for a in actions]
    assert all(o["source"] == "environment" for o in observations)


# Stop -----------------------------------------------------------------------------------------


def test_stop_cancels_the_agents_code_within_a_second_and_keeps_the_queue(agents, store, tmp_path):
    agents()
    cid = create(store, "steps 20 0.5")
    wait_until(lambda: "running" in states(store, cid, 0), 10, what="the run to start")
    queued = post(store, cid, "queued before the stop")
    wait_until(lambda: any(n[2] == "step1" for n in notes(tmp_path)), 10, what="the first step")
    stop = post_stop(store, cid)
    stopped_at = time.monotonic()
    run = answered(store, cid, 0, "stopped", timeout=5)
    assert time.monotonic() - stopped_at < 1.0
    wait_until(lambda: any(n[2] == "cancelled" for n in notes(tmp_path)), 2, what="the agent's code cancelled")
    cancelled = next(float(n[3]) for n in notes(tmp_path) if n[2] == "cancelled")
    assert cancelled - stopped_at < 1.0  # its own clock (monotonic, same host): it really stopped
    assert_one_run(run, consecutive=False)  # the queued message and the stop came in between
    assert run[-1]["id"] > stop
    assert not any(n[2] == "step20" for n in notes(tmp_path))
    assert store.get_conversation("alice", cid)["agent_state"] == "stopped"
    # The queued message stays queued while stopped; the next message starts a new run, queue first.
    time.sleep(0.5)
    assert states(store, cid, queued) == []
    latest = post(store, cid, "after the stop")
    assert_one_run(answered(store, cid, queued))
    assert_one_run(answered(store, cid, latest))
    assert events(store, cid)[-1]["cause"] == latest


def test_openhands_stop_action_stops_too(agents, store):
    agents()
    cid = create(store, "steps 20 0.5")
    wait_until(lambda: "running" in states(store, cid, 0), 10, what="the run to start")
    store.append_event("alice", cid, {"action": "change_agent_state", "args": {"agent_state": "stopped"}},
                       source="user", agent_kind="stop")
    answered(store, cid, 0, "stopped", timeout=3)


def test_stop_with_no_run_going_is_stored_and_changes_nothing(agents, store):
    agents()
    cid = create(store, "hi")
    answered(store, cid, 0)
    stop = post_stop(store, cid)
    time.sleep(0.5)
    assert events(store, cid)[-1]["id"] == stop
    assert store.get_conversation("alice", cid)["agent_state"] == "awaiting_user_input"
    later = post(store, cid, "still answering")
    assert_one_run(answered(store, cid, later))


# Failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "text"), [
    ("agent-error", "the repository is on fire"),
    ("crash", "the agent failed unexpectedly; the worker's log has the details"),
    ("bad", "the agent yielded a int, not an event (a dict)"),
])
def test_an_agent_error_is_an_error_event_and_the_worker_keeps_answering(agents, store, message, text):
    worker = agents()
    cid = create(store, message)
    run = answered(store, cid, 0, "error")
    assert_one_run(run)
    error = run[-2]
    assert error["type"] == "error" and error["source"] == "agent" and error["message"] == text
    assert "hunter2" not in json.dumps(events(store, cid))
    assert store.get_conversation("alice", cid)["agent_state"] == "error"
    assert_one_run(answered(store, cid, post(store, cid, "next")))
    assert worker.proc.poll() is None


def test_a_stuck_agent_is_ended_by_the_step_timeout(agents, store, tmp_path):
    agents(AGENT_STEP_TIMEOUT_SECONDS="0.5")
    cid = create(store, "hang")
    run = answered(store, cid, 0, "error", timeout=5)
    assert run[-2]["message"] == "the agent took longer than 0.5 s for one step"
    wait_until(lambda: any(n[2] == "cancelled" for n in notes(tmp_path)), 2, what="the hung agent cancelled")


def test_a_deleted_conversations_queued_messages_are_dropped(agents, store, redis_client):
    agents()
    cid = create(store, "steps 3 0.3")
    for n in range(3):
        post(store, cid, f"queued {n}")
    wait_until(lambda: "running" in states(store, cid, 0), 10, what="the run to start")
    store.delete_conversation("alice", cid)
    other = create(store, "another conversation")
    answered(store, other, 0)
    time.sleep(1.5)  # what the deleted one's run would have written by now
    assert list(redis_client.scan_iter(match=f"*{cid}*")) == []  # nothing written back into it
    wait_until(lambda: all(redis_client.xlen(agent_work_key(s)) == 0 for s in range(8)), 5, what="no work left")


# At least once, never twice -------------------------------------------------------------------


def test_a_killed_workers_run_is_finished_by_another_with_each_step_once(agents, store, tmp_path):
    first = agents()
    cid = create(store, "steps 6 0.3")
    wait_until(lambda: any(n[2] == "step2" for n in notes(tmp_path)), 10, what="two steps done")
    first.signal(signal.SIGKILL)
    first.proc.wait(5)
    agents()
    run = answered(store, cid, 0, timeout=20)
    assert_one_run(run)
    assert Counter(e["type"] for e in run) == {"agent_state_changed": 2, "agent_action": 6, "observation": 6,
                                                "agent_message": 1}
    assert [e["args"]["n"] for e in run if e["type"] == "agent_action"] == list(range(1, 7))


def test_a_paused_worker_that_wakes_after_a_takeover_writes_nothing_more(agents, store, tmp_path):
    # SIGSTOP past the lease: another worker takes the run over; the first, woken, finds its lease
    # gone and leaves the work entry to the new holder (it must not acknowledge it: killed next,
    # the new holder's work would be in no entry at all).
    first = agents()
    cid = create(store, "steps 16 0.25")
    wait_until(lambda: any(n[2] == "step1" for n in notes(tmp_path)), 10, what="a step done")
    first.signal(signal.SIGSTOP)
    try:
        second = agents()
        wait_until(lambda: sum(1 for n in notes(tmp_path) if n[2] == "start") == 2, 10, what="the takeover")
    finally:
        first.signal(signal.SIGCONT)
    wait_until(lambda: "LeaseLost" in first.log(), 10, what="the woken worker to find its lease gone")
    second.signal(signal.SIGKILL)  # mid-run: only its pending entry brings the run back
    agents()
    run = answered(store, cid, 0, timeout=30)
    time.sleep(1.0)  # anything a stale worker would still write is stored by now
    run = [e for e in events(store, cid) if e.get("cause") == 0]
    assert_one_run(run)
    assert [e["args"]["n"] for e in run if e["type"] == "agent_action"] == list(range(1, 17))


def test_redelivered_work_entries_add_no_second_answer(agents, store, redis_client):
    cid = create(store, "hi")
    shard = agent_work_key(agent_shard(cid, 8))
    for _ in range(20):  # the same conversation's work, delivered many times over
        redis_client.xadd(shard, {"c": cid})
    agents()
    agents()
    run = answered(store, cid, 0)
    wait_until(lambda: redis_client.xlen(shard) == 0, 10, what="every entry done")
    assert_one_run(run)
    assert len(events(store, cid)) == 4
    assert redis_client.xpending(shard, AGENT_GROUP)["pending"] == 0


def test_many_conversations_over_several_workers_each_answered_exactly_once(agents, store):
    for _ in range(3):
        agents(AGENT_CONCURRENCY="4")
    cids = [create(store, f"hello {n}") for n in range(30)]
    extra = {cid: post(store, cid, "again") for cid in cids}
    for cid in cids:
        answered(store, cid, extra[cid], timeout=30)
        runs = [[e for e in events(store, cid) if e.get("cause") == c] for c in (0, extra[cid])]
        for run in runs:
            assert_one_run(run, consecutive=False)  # "again" may land inside the first run
        assert len(events(store, cid)) == 2 + 3 + 3  # two messages, two runs of three events: nothing twice


def test_term_hands_a_long_run_over_to_another_worker(agents, store, tmp_path):
    first = agents()
    cid = create(store, "steps 40 0.25")
    wait_until(lambda: any(n[2] == "step1" for n in notes(tmp_path)), 10, what="a step done")
    agents()
    first.signal(signal.SIGTERM)
    first.signal(signal.SIGTERM)  # a second TERM: hand over at once
    assert first.proc.wait(10) == 0
    run = answered(store, cid, 0, timeout=30)
    assert_one_run(run)
    assert [e["args"]["n"] for e in run if e["type"] == "agent_action"] == list(range(1, 41))


# End to end -----------------------------------------------------------------------------------


def test_over_http_the_stream_shows_the_answer_live_and_the_connection_says_the_state(agents, start_server,
                                                                                       make_key):
    agents(AGENT="echo")
    server = start_server()
    api = Api(server.base, make_key("alice"))
    cid = api.create(initial_user_msg="hello over http")
    stream = open_stream(server.port, f"/api/sse/conversations/{cid}/events", headers=bearer(api.key))
    seen = [(ev.event, ev.json()) for ev in stream.take(5, timeout=15)]
    assert seen[0][0] == "connection" and seen[0][1]["agent_state"] in (None, "running", "awaiting_user_input")
    assert [(e["type"], e.get("agent_state")) for _name, e in seen[1:]] == [
        ("user_message", None), ("agent_state_changed", "running"), ("agent_message", None),
        ("agent_state_changed", "awaiting_user_input")]
    assert [e.get("cause") for _name, e in seen[2:]] == [0, 0, 0]
    status, conversation, _ = api.call("GET", f"/api/conversations/{cid}")
    assert status == 200 and conversation["agent_state"] == "awaiting_user_input"
    again = open_stream(server.port, f"/api/sse/conversations/{cid}/events?latest_event_id=3", headers=bearer(api.key))
    connection = again.take(1)[0]
    assert connection.event == "connection" and connection.json()["agent_state"] == "awaiting_user_input"
    # A message posted over HTTP is answered live on the open stream.
    event_id = api.post(cid, type="user_message", content="and live")
    live = [ev.json() for ev in stream.take(4, timeout=15)]
    assert [e["type"] for e in live] == ["user_message", "agent_state_changed", "agent_message", "agent_state_changed"]
    assert live[0]["id"] == event_id and {e.get("cause") for e in live[1:]} == {event_id}
