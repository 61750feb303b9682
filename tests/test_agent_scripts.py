"""The run scripts on a real Redis, call by call: what a re-sent call (after a lost reply) and a stale worker get."""
from __future__ import annotations

import json

import pytest

from app.agent.runs import Claim, ConversationGone, LeaseLost, RunEnded, RunStore
from app.keys import agent_shard, conv_inbox_key, conv_meta_key, conv_reply_key


@pytest.fixture()
def runs(app) -> RunStore:
    """The runs of the app's store, with a 10 s lease."""
    return RunStore(app.extensions["store"], lease_ms=10_000, history=50)


@pytest.fixture()
def store(app):
    """The app's store."""
    return app.extensions["store"]


def conversation(store, message: str = "hi") -> str:
    """A conversation with one queued message (event 0)."""
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository="o/r", branch="b", title="t", initial_user_msg=message)
    return cid


def stored(store, cid: str) -> list[dict]:
    """The conversation's events."""
    return [json.loads(e) for e in store.list_events("alice", cid, 0, 1000)[0]]


def test_acquire_gives_the_oldest_queued_message_with_its_history(runs, store):
    cid = conversation(store, "first")
    store.append_event("alice", cid, {"type": "user_message", "content": "second"}, source="user",
                       agent_kind="message")
    claim = runs.acquire(cid, "t1")
    assert isinstance(claim, Claim)
    assert (claim.cause, claim.steps_written, claim.stop, claim.repository, claim.selected_branch) == \
        (0, 0, False, "o/r", "b")
    assert [e["content"] for e in claim.history] == ["first"]  # up to the message it answers
    assert runs.acquire(cid, "t2") == "busy"
    assert runs.acquire(cid, "t1").cause == 0  # the holder asking again: still its lease


def test_a_resent_step_is_stored_once_and_answers_the_first_id(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "t1")
    first = runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent",
                      state="running")
    again = runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent",
                      state="running")
    assert first == (1, False) and again == (1, True)
    with pytest.raises(RuntimeError):
        runs.emit(cid, "t1", 0, 3, {"type": "agent_message", "content": "x"}, source="agent")  # step 2 skipped
    assert len(stored(store, cid)) == 2


def test_a_resent_finish_ends_the_run_once(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "t1")
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    assert runs.finish(cid, "t1", 0, 2, "awaiting_user_input") == (False, "awaiting_user_input")
    assert runs.finish(cid, "t1", 0, 2, "awaiting_user_input") == (False, "")  # nothing written again
    assert [e["type"] for e in stored(store, cid)] == ["user_message", "agent_state_changed", "agent_state_changed"]
    assert store.redis.llen(conv_inbox_key(cid)) == 0
    assert runs.acquire(cid, "t2") == "idle"
    with pytest.raises(RunEnded):
        runs.emit(cid, "t1", 0, 3, {"type": "agent_message", "content": "late"}, source="agent")


def test_a_worker_whose_lease_was_taken_writes_nothing(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "old")
    store.redis.hset(conv_meta_key(cid), "agent_lease_until", 0)  # its lease ran out
    assert isinstance(runs.acquire(cid, "new"), Claim)
    for call in (lambda: runs.emit(cid, "old", 0, 1, {"type": "agent_message", "content": "x"}, source="agent"),
                 lambda: runs.finish(cid, "old", 0, 1, "awaiting_user_input"),
                 lambda: runs.delta(cid, "old", 0, 0, 0, "x")):
        with pytest.raises(LeaseLost):
            call()
    assert runs.renew([(cid, "old"), (cid, "new")]) == [(0, False), (1, False)]
    assert len(stored(store, cid)) == 1


def test_a_deleted_conversation_is_never_written_back(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "t1")
    store.delete_conversation("alice", cid)
    with pytest.raises(ConversationGone):
        runs.emit(cid, "t1", 0, 1, {"type": "agent_message", "content": "x"}, source="agent")
    with pytest.raises(ConversationGone):
        runs.finish(cid, "t1", 0, 1, "awaiting_user_input")
    with pytest.raises(ConversationGone):
        runs.delta(cid, "t1", 0, 0, 0, "x")
    assert runs.acquire(cid, "t1") == "gone"
    assert runs.renew([(cid, "t1")]) == [(-1, False)]
    assert list(store.redis.scan_iter(match=f"*{cid}*")) == []


def test_deltas_build_the_reply_once_per_offset_and_the_message_ends_it(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "t1")
    assert runs.delta(cid, "t1", 0, 0, 0, "héllo ") is True
    assert runs.delta(cid, "t1", 0, 0, 0, "héllo ") is False  # re-sent: already there
    assert runs.delta(cid, "t1", 0, 6, 7, "world") is True  # offsets: 6 characters, 7 bytes
    assert store.redis.get(conv_reply_key(cid)).decode() == "0:héllo world"
    assert runs.delta(cid, "t1", 0, 40, 40, "gap") is False  # a gap (a run taken over mid-reply): skipped
    assert store.redis.get(conv_reply_key(cid)).decode() == "0:héllo world"
    runs.emit(cid, "t1", 0, 1, {"type": "agent_message", "content": "héllo world"}, source="agent", ends_reply=True)
    assert store.redis.exists(conv_reply_key(cid)) == 0


def test_a_stop_marks_only_a_run_going_and_pauses_the_queue(runs, store):
    cid = conversation(store)
    post = lambda fields, kind: store.append_event("alice", cid, fields, source="user", agent_kind=kind)[0]  # noqa: E731
    post({"type": "stop"}, "stop")  # message 0 is queued, but no worker has taken it: no run is going
    assert store.redis.hget(conv_meta_key(cid), "agent_stop") is None
    claim = runs.acquire(cid, "t1")
    assert claim.cause == 0 and not claim.stop
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    queued = post({"type": "user_message", "content": "queued"}, "message")
    stop = post({"type": "stop"}, "stop")
    assert int(store.redis.hget(conv_meta_key(cid), "agent_stop")) == stop
    assert runs.renew([(cid, "t1")]) == [(1, True)]  # the heartbeat learns it
    assert runs.finish(cid, "t1", 0, 2, "awaiting_user_input") == (False, "stopped")  # the stop wins
    assert runs.acquire(cid, "t2") == "paused"
    post({"type": "stop"}, "stop")  # with no run going: stored, changes nothing
    assert store.redis.hget(conv_meta_key(cid), "agent_stop") is None
    later = post({"type": "user_message", "content": "later"}, "message")
    claim = runs.acquire(cid, "t2")
    assert claim.cause == queued and not claim.stop  # the queue first, then `later`
    assert store.redis.lrange(conv_inbox_key(cid), 0, -1) == [str(queued).encode(), str(later).encode()]


def test_a_message_posted_after_the_stop_is_not_held_back(runs, store):
    cid = conversation(store)
    post = lambda fields, kind: store.append_event("alice", cid, fields, source="user", agent_kind=kind)[0]  # noqa: E731
    runs.acquire(cid, "t1")
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    post({"type": "stop"}, "stop")
    after = post({"type": "user_message", "content": "right after the stop"}, "message")
    assert runs.finish(cid, "t1", 0, 2, "awaiting_user_input") == (True, "stopped")  # more: the lease kept
    assert runs.acquire(cid, "t1").cause == after


def test_a_run_that_fails_while_a_stop_is_asked_is_an_error_and_holds_nothing_back(runs, store):
    cid = conversation(store)
    post = lambda fields, kind: store.append_event("alice", cid, fields, source="user", agent_kind=kind)[0]  # noqa: E731
    runs.acquire(cid, "t1")
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    queued = post({"type": "user_message", "content": "queued"}, "message")
    post({"type": "stop"}, "stop")
    assert runs.finish(cid, "t1", 0, 2, "error") == (True, "error")
    assert runs.acquire(cid, "t1").cause == queued


def test_touch_leaves_an_entry_another_consumer_claimed_to_them(runs, store, redis_client):
    runs.ensure_groups()
    cid = conversation(store)
    shard = agent_shard(cid, runs.shards)
    [(entry, _cid)] = runs.read_work(store.redis, shard, "a", 10, 0)
    _cursor, work = runs.claim_idle(shard, "b", 0, 10)
    assert [e for e, _ in work] == [entry]
    assert runs.touch(shard, "a", [entry]) == 0  # woken after b took it: a takes nothing back
    assert runs.touch(shard, "b", [entry]) == 1
    assert redis_client.xpending_range(f"agent:work:{{{shard}}}", "agents", "-", "+", 10)[0]["consumer"] == b"b"


def test_a_replayed_message_post_queues_nothing_twice(store):
    cid = conversation(store)
    for _ in range(3):
        store.append_event("alice", cid, {"type": "user_message", "content": "once"}, source="user",
                           idempotency=("k" * 64, "d"), agent_kind="message")
    assert store.redis.lrange(conv_inbox_key(cid), 0, -1) == [b"0", b"1"]


def test_a_stop_between_two_runs_or_during_a_hand_over(runs, store):
    cid = conversation(store)
    post = lambda fields, kind: store.append_event("alice", cid, fields, source="user", agent_kind=kind)[0]  # noqa: E731
    runs.acquire(cid, "t1")
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    queued = post({"type": "user_message", "content": "queued"}, "message")
    assert runs.finish(cid, "t1", 0, 2, "awaiting_user_input") == (True, "awaiting_user_input")
    post({"type": "stop"}, "stop")  # between two runs (the lease kept): no run is going, nothing stops
    claim = runs.acquire(cid, "t1")
    assert claim.cause == queued and not claim.stop
    runs.emit(cid, "t1", queued, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    runs.release(cid, "t1")  # a hand-over: no worker holds it for a moment, the run is still going
    stop = post({"type": "stop"}, "stop")
    assert int(store.redis.hget(conv_meta_key(cid), "agent_stop")) == stop
    claim = runs.acquire(cid, "t2")
    assert claim.cause == queued and claim.stop and claim.steps_written == 1


def test_a_reply_begun_by_another_attempt_gets_no_bits_of_this_one(runs, store):
    cid = conversation(store)
    runs.acquire(cid, "first")
    runs.emit(cid, "first", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    assert runs.delta(cid, "first", 0, 0, 0, "The answer") is True
    runs.release(cid, "first")
    runs.acquire(cid, "second")
    sent = [runs.delta(cid, "second", 0, o, o, t) for o, t in ((0, "A"), (1, " reply"), (7, " is"), (10, " here"))]
    assert sent == [False, False, False, False]
    assert store.redis.get(conv_reply_key(cid)).decode() == "0:The answer"


def test_a_work_entry_is_added_only_when_nothing_was_queued_or_the_queue_was_held(runs, store, redis_client):
    cid = conversation(store)  # message 0 queued: one entry
    shard = f"agent:work:{{{agent_shard(cid, runs.shards)}}}"
    post = lambda fields, kind: store.append_event("alice", cid, fields, source="user", agent_kind=kind)[0]  # noqa: E731
    for n in range(3):
        post({"type": "user_message", "content": f"queued {n}"}, "message")
    assert redis_client.xlen(shard) == 1  # its entry stays pending until the whole queue is answered
    runs.acquire(cid, "t1")
    runs.emit(cid, "t1", 0, 1, {"type": "agent_state_changed", "agent_state": "running"}, source="agent")
    post({"type": "stop"}, "stop")
    runs.finish(cid, "t1", 0, 2, "awaiting_user_input")  # stopped: the queue is held
    post({"type": "user_message", "content": "go on"}, "message")
    assert redis_client.xlen(shard) == 2  # the held queue goes on: the agents are told again
