"""A stream opened on a conversation its worker follows already reads the store with the caller's checks.

What is stored after the client's id comes in the same round trip as the key and the owner, and
the store is not read again once the stream registers, unless something may fall between the
two. These tests hold it to the contract all the same: every event once, in order, with
`history_truncated` where retention dropped some, under concurrent posts.
"""
from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

from app import stream

from .conftest import Api, bearer, xrange_calls
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"


def ids(events) -> list[int]:
    """The ids of the conversation events among `events`."""
    return [int(e.id) for e in events if e.id is not None]


def test_a_second_tab_gets_the_backlog_with_its_opening_from_one_read(server, api, redis_client):
    cid = api.create(initial_user_msg="first")
    for i in range(3):
        api.post(cid, type="user_message", content=f"m{i}")
    first = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert ids(first.take(5)[1:]) == [0, 1, 2, 3]
    before = xrange_calls(redis_client)
    second = open_stream(server.port, SSE.format(cid), bearer(api.key))
    hello, *backlog = second.take(5)
    assert hello.event == "connection" and hello.json()["latest_event_id"] == -1
    assert ids(backlog) == [0, 1, 2, 3]
    assert backlog[0].json()["content"] == "first"
    assert xrange_calls(redis_client) - before == 1  # read with the checks, not again
    resumed = open_stream(server.port, SSE.format(cid), {**bearer(api.key), "Last-Event-ID": "2"})
    assert ids(resumed.take(2)[1:]) == [3]
    api.post(cid, type="user_message", content="live")
    for tab in (first, second, resumed):
        assert ids(tab.take(1)) == [4]
    ahead = open_stream(server.port, SSE.format(cid) + "?latest_event_id=99", bearer(api.key))
    assert ahead.take(1)[0].event == "connection"
    api.post(cid, type="user_message", content="after")
    assert ids(ahead.take(1, timeout=3)) == []  # nothing after 99 yet: only events past it would come
    assert ids(first.take(1)) == [5]


def test_more_than_a_page_stored_is_read_on_after_it(server, api):
    cid = api.create()
    for i in range(130):
        api.post(cid, type="user_message", content=f"m{i}")
    first = open_stream(server.port, SSE.format(cid) + "?latest_event_id=128", bearer(api.key))
    assert ids(first.take(2)[1:]) == [129]
    second = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert ids(second.take(131)[1:]) == list(range(130))
    api.post(cid, type="user_message", content="live")
    assert ids(second.take(1)) == [130]


def test_history_truncated_comes_first_when_retention_dropped_what_the_client_wanted(start_server, make_key):
    server = start_server(EVENT_RETENTION="5")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    for i in range(12):
        api.post(cid, type="user_message", content=f"m{i}")
    first = open_stream(server.port, SSE.format(cid) + "?latest_event_id=11", bearer(api.key))
    assert first.take(1)[0].event == "connection"
    second = open_stream(server.port, SSE.format(cid), {**bearer(api.key), "Last-Event-ID": "0"})
    hello, truncated, *events = second.take(7)
    assert truncated.event == "history_truncated"
    assert truncated.json() == {"earliest_event_id": 7}
    assert ids(events) == [7, 8, 9, 10, 11]


def test_tabs_opened_while_events_are_posted_get_every_event_once_in_order(server, api):
    """Streams opened at random moments of a burst of posts, on a conversation another tab follows."""
    cid = api.create(initial_user_msg="start")
    anchor = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert ids(anchor.take(2)[1:]) == [0]
    total = 150
    posted: list[int] = []

    def post_all() -> None:
        poster = Api(api.base, api.key)
        for i in range(total):
            posted.append(poster.post(cid, type="user_message", content=f"m{i}"))
            if i % 10 == 0:
                time.sleep(0.01)

    poster = threading.Thread(target=post_all)
    poster.start()
    tabs = []
    rng = random.Random(7)
    while poster.is_alive() and len(tabs) < 25:
        latest = rng.choice([-1, -1, max(-1, (posted[-1] if posted else 0) - rng.randint(0, 3))])
        tabs.append((latest, open_stream(server.port, SSE.format(cid) + f"?latest_event_id={latest}",
                                         bearer(api.key))))
        time.sleep(rng.uniform(0, 0.03))
    poster.join(60)
    assert len(posted) == total and posted[-1] == total
    assert len(tabs) >= 5, "the posts went too fast to open tabs meanwhile"
    assert ids(anchor.take(total, timeout=10)) == list(range(1, total + 1))
    for latest, tab in tabs:
        got = ids(tab.take(1 + total - latest, timeout=10))  # its connection event, then every id after `latest`
        assert got == list(range(latest + 1, total + 1)), (latest, got[:5], len(got))


# The two checks around the read, on stand-ins for the hub's state ------------------------------


def fake_hub(cid: str, *, subscribed: bool = True, position: int | None = None, closing: bool = False):
    """A stand-in with what `followed` and `gapless` look at: the followed conversations, the listener."""
    conv = SimpleNamespace(cid=cid, channel=cid.encode(), position=position)
    listener = SimpleNamespace(is_subscribed=lambda channel: subscribed and channel == conv.channel)
    return SimpleNamespace(closing=closing, conversations={cid: conv}, listener=listener), conv


def test_only_a_conversation_followed_with_redis_confirmation_is_read_ahead():
    hub, conv = fake_hub("c1")
    assert stream.followed(hub, "c1") is conv
    assert stream.followed(hub, "c2") is None
    assert stream.followed(None, "c1") is None
    assert stream.followed(fake_hub("c1", subscribed=False)[0], "c1") is None  # SUBSCRIBE not confirmed (yet, again)
    assert stream.followed(fake_hub("c1", closing=True)[0], "c1") is None


def test_the_read_ahead_counts_only_while_nothing_past_it_was_handed_out_and_the_conversation_is_the_same():
    hub, conv = fake_hub("c1")
    assert stream.gapless(hub, conv, upto=-1)  # nothing handed out yet: all that comes is still to come
    conv.position = 4
    assert stream.gapless(hub, conv, upto=4)
    assert stream.gapless(hub, conv, upto=9)  # resumed past what was handed out
    assert not stream.gapless(hub, conv, upto=3)  # event 4 went out before the stream registered
    hub.conversations["c1"] = SimpleNamespace(cid="c1", channel=b"c1", position=None)
    assert not stream.gapless(hub, conv, upto=9)  # left and followed anew: its subscription came after the read
    del hub.conversations["c1"]
    assert not stream.gapless(hub, conv, upto=9)
