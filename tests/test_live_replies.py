"""Live reply deltas (API.md "Live replies") and agent_state in the connection event.

The deltas are published as the agent runtime does: by a script that keeps the reply so far in
the conversation's reply key and publishes `~<last_event_id>:<json>` in the same step.
"""
from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from app import replies, stream
from app.keys import conv_channel, conv_events_key, conv_meta_key, conv_reply_key
from app.replies import Delta, frame_for, parse_delta, parse_reply, trim
from app.subscriber import Batch, Subscriber

from .conftest import bearer
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"

PUBLISH_LUA = "return redis.call(ARGV[2], KEYS[1], ARGV[1])"

# What the runtime's delta script does. KEYS: meta, reply, channel. ARGV: the reply so far
# (`<cause>:<text>`), the delta's JSON, the publish command.
DELTA_LUA = """
local last = redis.call('HGET', KEYS[1], 'last_event_id') or '-1'
redis.call('SET', KEYS[2], ARGV[1])
redis.call(ARGV[3], KEYS[3], '~' .. last .. ':' .. ARGV[2])
return tonumber(last)
"""


class Runtime:
    """The agent runtime's side of a reply, written straight into Redis."""

    def __init__(self, app, redis_client):
        self.store = app.extensions["store"]
        self.script = redis_client.register_script(DELTA_LUA)
        self._publish = redis_client.register_script(PUBLISH_LUA)
        self.so_far: dict[tuple[str, int], str] = {}

    def delta(self, cid: str, cause: int, text: str) -> int:
        """Publish the next bit of the reply to `cause`; the last event id it was published after."""
        before = self.so_far.get((cid, cause), "")
        self.so_far[(cid, cause)] = before + text
        data = orjson.dumps({"cause": cause, "offset": len(before), "text": text})
        return self.script(keys=[conv_meta_key(cid), conv_reply_key(cid), conv_channel(cid)],
                           args=[f"{cause}:{before + text}".encode(), data, self.store.publish])

    def publish(self, cid: str, payload: bytes) -> None:
        """Publish a message of our own making on the conversation's channel."""
        self._publish(keys=[conv_channel(cid)], args=[payload, self.store.publish])

    def final(self, cid: str, cause: int) -> int:
        """Store the reply as one agent_message and end it (the runtime does both in one step); its id."""
        content = self.so_far.pop((cid, cause))
        event_id, _ = self.store.append_event(None, cid, {"type": "agent_message", "content": content, "cause": cause},
                                              source="agent")
        self.store.redis.delete(conv_reply_key(cid))
        return event_id


@pytest.fixture()
def runtime(app, redis_client) -> Runtime:
    """Deltas and final messages, as the runtime writes them."""
    return Runtime(app, redis_client)


def deltas(events) -> list[dict]:
    """The data of the reply deltas among `events`."""
    return [ev.json() for ev in events if ev.event == "agent_message_delta"]


def ids(events) -> list[int]:
    """The ids of the conversation events among `events`."""
    return [int(ev.id) for ev in events if ev.id is not None]


def opened(server, api, cid: str, headers: dict[str, str] | None = None):
    """A stream of `cid` whose connection event has arrived: (stream, connection event data)."""
    s = open_stream(server.port, SSE.format(cid), {**bearer(api.key), **(headers or {})})
    hello = s.take(1)[0]
    assert hello.event == "connection"
    return s, hello.json()


# Over a real gunicorn and Redis ---------------------------------------------------------------


def test_live_deltas_arrive_named_with_no_id_then_the_final_message(server, api, runtime):
    cid = api.create(initial_user_msg="hi")
    s, _ = opened(server, api, cid)
    assert ids(s.take(1)) == [0]
    assert runtime.delta(cid, 0, "Hel") == 0
    runtime.delta(cid, 0, "lo, wörld 🌍")
    got = s.take(2)
    assert [ev.event for ev in got] == ["agent_message_delta"] * 2
    assert [ev.id for ev in got] == [None, None]  # no id: line, so Last-Event-ID stays 0
    assert deltas(got) == [{"cause": 0, "offset": 0, "text": "Hel"}, {"cause": 0, "offset": 3, "text": "lo, wörld 🌍"}]
    assert runtime.final(cid, 0) == 1
    final = s.take(1)[0]
    assert final.id == "1" and final.json()["content"] == "Hello, wörld 🌍" and final.json()["cause"] == 0
    # The next reply of the same run (same cause) starts at offset 0 again and is sent whole.
    runtime.delta(cid, 0, "And")
    assert deltas(s.take(1)) == [{"cause": 0, "offset": 0, "text": "And"}]
    # Deltas moved no id: a resume from the last event id gets nothing twice.
    resumed, _ = opened(server, api, cid, {"Last-Event-ID": "1"})
    assert deltas(resumed.take(1)) == [{"cause": 0, "offset": 0, "text": "And"}]  # the reply so far, once
    assert s.empty_blocks == 0


def test_malformed_announcements_are_skipped_and_the_rest_of_their_read_still_goes_out(server, api, runtime):
    cid = api.create(initial_user_msg="hi")
    s, _ = opened(server, api, cid)
    assert ids(s.take(1)) == [0]
    # Anyone with access to Redis may publish on the channel: none of these may stall the hub.
    for bad in (b"~--1:{}", b"~" + b"9" * 5000 + b":{}", b"~0:not json", b"#" + b"9" * 5000, b"#\xc2\xb2",
                b'{"id":' + b"9" * 5000 + b",", b"\xff\xfe"):
        runtime.publish(cid, bad)
    runtime.delta(cid, 0, "still here")
    api.post(cid, type="user_message", content="and this")
    got = s.take(2)
    assert deltas(got) == [{"cause": 0, "offset": 0, "text": "still here"}] and ids(got) == [1]
    assert "reconnecting" not in server.log()


def test_a_stream_opened_mid_reply_gets_the_stored_events_then_the_text_so_far_then_the_rest(server, api, runtime):
    cid = api.create(initial_user_msg="hi")
    api.post(cid, type="user_message", content="more")
    runtime.delta(cid, 1, "The answer")
    runtime.delta(cid, 1, " is")
    first, _ = opened(server, api, cid)  # the first stream of the conversation: read after it registers
    got = first.take(3)
    assert ids(got) == [0, 1] and got[2].event == "agent_message_delta" and got[2].id is None
    assert got[2].json() == {"cause": 1, "offset": 0, "text": "The answer is"}
    # Another tab, on a conversation this worker follows already: read with the caller's checks.
    second, _ = opened(server, api, cid)
    got = second.take(3)
    assert ids(got) == [0, 1] and deltas(got) == [{"cause": 1, "offset": 0, "text": "The answer is"}]
    resumed, _ = opened(server, api, cid, {"Last-Event-ID": "1"})
    assert deltas(resumed.take(1)) == [{"cause": 1, "offset": 0, "text": "The answer is"}]
    runtime.delta(cid, 1, " 42")
    for tab in (first, second, resumed):
        assert deltas(tab.take(1)) == [{"cause": 1, "offset": 13, "text": " 42"}]
    assert runtime.final(cid, 1) == 2
    for tab in (first, second, resumed):
        assert ids(tab.take(1)) == [2]
    # Once the reply is stored, a new stream gets the events and no delta.
    late, _ = opened(server, api, cid)
    assert ids(late.take(3)) == [0, 1, 2]
    assert late.take(1, timeout=1.5) == []


def test_a_delta_goes_out_only_at_its_place_among_the_events(server, api, runtime, redis_client):
    cid = api.create(initial_user_msg="hi")
    s, _ = opened(server, api, cid)
    assert ids(s.take(1)) == [0]
    # Stored but not announced (as with REDIS_MIN_REPLICAS_ACK, before the append's caller announces it):
    # the delta published after it says last_event_id 1, so the stream reads event 1 first.
    redis_client.xadd(conv_events_key(cid), {"e": b'{"id":1,"source":"user","type":"user_message","content":"x"}'},
                      id="2-0")
    redis_client.hset(conv_meta_key(cid), "last_event_id", 1)
    assert runtime.delta(cid, 1, "ok") == 1
    got = s.take(2)
    assert ids(got) == [1] and deltas(got) == [{"cause": 1, "offset": 0, "text": "ok"}]
    assert got[0].id == "1" and got[1].id is None
    # A delta published before events this stream has sent already is dropped (it may be older
    # than a final message the client has); the next one at the current place goes out.
    api.post(cid, type="user_message", content="y")
    assert ids(s.take(1)) == [2]
    runtime.publish(cid, b'~1:{"cause":1,"offset":2,"text":" stale"}')
    runtime.delta(cid, 1, " fresh")
    assert deltas(s.take(1)) == [{"cause": 1, "offset": 2, "text": " fresh"}]


def test_the_connection_event_says_the_agent_state(server, api, redis_client):
    cid = api.create()
    s, hello = opened(server, api, cid)
    assert list(hello) == ["type", "connection_id", "conversation_id", "latest_event_id", "providers_set",
                           "agent_state"]
    assert hello["agent_state"] is None
    redis_client.hset(conv_meta_key(cid), "agent_state", "awaiting_user_input")
    _, hello = opened(server, api, cid)  # followed already: the prefetching path
    assert hello["agent_state"] == "awaiting_user_input"
    s.close()
    redis_client.hset(conv_meta_key(cid), "agent_state", "running")
    _, hello = opened(server, api, cid)
    assert hello["agent_state"] == "running"


# The rules, on their own -------------------------------------------------------------------


def test_the_trimming_rule():
    assert trim(0, 0, "abc") == (0, "abc")
    assert trim(3, 0, "abc") is None  # all of it sent
    assert trim(5, 0, "abc") is None
    assert trim(3, 3, "") is None
    assert trim(2, 0, "abcd") == (2, "cd")  # the part it lacks, from where it is
    assert trim(3, 1, "bcdé") == (3, "dé")
    assert trim(3, 3, "de") == (3, "de")
    assert trim(3, 7, "xy") == (7, "xy")  # a gap (a lost message): sent as it is


def sub_at(last_sent: int) -> Subscriber:
    """A stream that has sent events up to `last_sent`."""
    return Subscriber("c", "u", "k", "", last_sent)


def delta(upto: int, cause: int, offset: int, text: str) -> Delta:
    """A delta published after event `upto`."""
    return Delta(upto, cause, offset, text)


def test_what_a_stream_gets_of_each_delta():
    sub = sub_at(4)
    assert frame_for(sub, delta(4, 3, 0, "Hello")) == delta(4, 3, 0, "Hello").frame
    assert frame_for(sub, delta(4, 3, 2, "llo")) is None  # a repeat
    assert frame_for(sub, delta(4, 3, 3, "lo, you")) == replies.delta_frame(3, 5, ", you")
    assert (sub.reply_cause, sub.reply_chars) == (3, 10)
    assert frame_for(sub, delta(4, 7, 0, "Hi")) == delta(4, 7, 0, "Hi").frame  # another cause: a new reply
    sub.last_sent = 5  # an event went out since (the reply's agent_message): the same cause starts anew
    assert frame_for(sub, delta(5, 7, 0, "Hi")) == delta(5, 7, 0, "Hi").frame


def test_the_snapshot_and_the_deltas_queued_meanwhile_make_the_text_once():
    sub = sub_at(2)
    assert replies.snapshot(sub, None) == b""
    assert replies.snapshot(sub, "1:Hello, wö".encode()) == replies.delta_frame(1, 0, "Hello, wö")
    # The reply "Hello, wörld!" in four deltas, of which the first two and a half came before the snapshot.
    queued = [delta(2, 1, 0, "Hel"), delta(2, 1, 3, "lo, "), delta(2, 1, 7, "wörld"), delta(2, 1, 12, "!")]
    for d in queued:
        sub.deliver_delta(d, 100)
    store = SimpleNamespace(read_after=lambda *a: pytest.fail("nothing to read"))
    out = stream.live_frames(store, sub)
    assert out == replies.delta_frame(1, 9, "rld") + replies.delta_frame(1, 12, "!")


def event(n: int) -> tuple[int, bytes]:
    """A stored event: (id, its JSON)."""
    return n, b'{"id":%d}' % n


def frames(*ns: int) -> bytes:
    """The frames of these events."""
    return b"".join(stream.event_frame(n, data) for n, data in map(event, ns))


def test_a_queued_delta_waits_for_the_events_before_it_and_is_dropped_after_later_ones():
    stored = {n: event(n)[1] for n in range(10)}
    reads = []

    def read_after(cid, after, count):
        reads.append(after)
        return [(n, stored[n]) for n in sorted(stored) if n > after][:count]

    store = SimpleNamespace(read_after=read_after)
    sub = sub_at(3)
    sub.deliver_delta(delta(5, 1, 0, "a"), 100)  # announcements of 4 and 5 lost, or still to come
    sub.deliver(Batch([(n, frames(n)) for n in (5, 6)]), 100)
    sub.deliver_delta(delta(5, 1, 1, "b"), 100)  # older than event 6, which it has by now
    sub.deliver_delta(delta(6, 1, 1, "c"), 100)
    assert stream.live_frames(store, sub) == frames(4, 5) + replies.delta_frame(1, 0, "a") + frames(6) \
        + replies.delta_frame(1, 1, "c")
    assert reads == [3] and sub.last_sent == 6
    del stored[7], stored[8]  # trimmed by retention: the delta after 8 cannot be placed, and is dropped
    sub.deliver_delta(delta(8, 1, 2, "d"), 100)
    assert stream.live_frames(store, sub) == b""
    assert sub.last_sent == 6


def test_queued_deltas_count_towards_the_queue_limit():
    sub = sub_at(0)
    for i in range(3):
        sub.deliver_delta(delta(0, 1, i, "x"), 3)
    assert sub.end_reason is None
    sub.deliver_delta(delta(0, 1, 3, "x"), 3)
    assert sub.end_reason == "overflow" and sub.pending == []


def test_a_live_stream_gets_each_delta_written_at_once_only_at_its_place(monkeypatch):
    written = []
    sub = sub_at(4)
    sub.direct = True
    sub.fd = -1
    monkeypatch.setattr("app.subscriber.os.write", lambda fd, data: written.append(data) or len(data))
    replies.hand_out([sub], delta(4, 2, 0, "ab"), 10)
    assert written == [delta(4, 2, 0, "ab").chunk] and sub.pending == []
    replies.hand_out([sub], delta(5, 2, 2, "c"), 10)  # event 5 not sent yet: queued for the greenlet
    assert len(written) == 1 and len(sub.pending) == 1
    replies.hand_out([sub], delta(5, 2, 3, "d"), 10)  # behind a queued one: queued too, in order
    assert len(written) == 1 and len(sub.pending) == 2
    replies.hand_out([sub], delta(3, 2, 0, "old"), 10)  # from before event 4, which it has sent: never sent
    assert len(written) == 1 and len(sub.pending) == 2


def test_malformed_deltas_and_replies_are_ignored():
    good = parse_delta(b'~12:{"cause":3,"offset":4,"text":"h\\u00e9\\n"}')
    assert (good.upto, good.cause, good.offset, good.text) == (12, 3, 4, "hé\n")
    assert good.frame == b'event: agent_message_delta\ndata: {"cause":3,"offset":4,"text":"h\xc3\xa9\\n"}\n\n'
    assert good.frame.count(b"\n") == 3  # one data line whatever the text holds
    assert parse_delta(b'~-1:{"cause":0,"offset":0,"text":""}').upto == -1
    for junk in (b"~", b"~x:{}", b"~1", b"~1:", b"~1:[]", b"~1:{nope", b'~1:{"cause":"3","offset":0,"text":""}',
                 b'~1:{"cause":3,"offset":-1,"text":""}', b'~1:{"cause":true,"offset":0,"text":""}',
                 b'~1:{"cause":3,"offset":0,"text":5}'):
        assert parse_delta(junk) is None, junk
    assert parse_reply(b"7:abc:d") == (7, "abc:d")
    assert parse_reply(b"7:") == (7, "")
    for junk in (b"abc", b":abc", b"x:abc", b"7:\xff"):
        assert parse_reply(junk) is None, junk


def test_the_hub_keeps_deltas_in_their_place_among_the_events():
    batches = [event(1), event(2), delta(2, 0, 0, "a"), event(3), delta(3, 0, 1, "b"), delta(3, 0, 2, "c")]
    runs = list(replies.runs(batches))
    assert runs == [[event(1), event(2)], batches[2], [event(3)], batches[4], batches[5]]
    assert list(replies.runs([event(1)])) == [[event(1)]]
