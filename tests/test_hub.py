"""The hub under faults: pub/sub lost, bad announcements and entries, retention gaps, many conversations."""
from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request

from app import create_app
from app.redis import close

from .conftest import Api, bearer
from .servers import wait_until
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"


def health(server, path: str = "/healthz") -> tuple[int, dict]:
    """(status, body) of /healthz (or `path`)."""
    try:
        with urllib.request.urlopen(server.base + path, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ids_of(events) -> list[int]:
    """The ids of conversation events (named events left out)."""
    return [int(ev.id) for ev in events if ev.id is not None]


def kill_pubsub(redis_client) -> int:
    """Cut every pub/sub connection (the hubs'); how many."""
    return redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


def test_the_pubsub_connection_killed_while_posting_loses_and_repeats_nothing(server, api, redis_client):
    cids = [api.create() for _ in range(3)]
    streams = [open_stream(server.port, SSE.format(cid), bearer(api.key)) for cid in cids for _ in range(2)]
    for s in streams:
        assert s.take(1)[0].event == "connection"
    posted = {cid: 0 for cid in cids}
    for round_ in range(12):
        for cid in cids:
            api.post(cid)
            posted[cid] += 1
        if round_ in (3, 7):
            # Once it has subscribed again after the last kill.
            wait_until(lambda: kill_pubsub(redis_client) >= 1, 10, what="a pub/sub connection to kill")
    for i, s in enumerate(streams):
        got = ids_of(s.take(posted[cids[i // 2]], timeout=10))
        assert got == list(range(posted[cids[i // 2]])), got  # every event once, in order
    wait_until(lambda: health(server)[0] == 200, 10, what="the hub reading again")


def test_bad_announcements_and_entries_do_not_stop_the_events(server, api, redis_client):
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    assert api.post(cid) == 0
    channel = f"conv:{{{cid}}}:live"
    for junk in (b"", b"garbage", b'{"id":x}', b'{"id":', b"\xff\xfe", b'{"no":"id"}'):
        redis_client.publish(channel, junk)
    redis_client.xadd(f"conv:{{{cid}}}:events", {"not-an-event": "x"}, id="2-0")  # event 1, not ours
    redis_client.hset(f"conv:{{{cid}}}:meta", "last_event_id", 1)
    assert api.post(cid) == 2
    got = stream.take(3)  # event 1 cannot be sent: it is said missing (history_truncated) instead
    assert ids_of(got) == [0, 2] and [ev.event for ev in got][1] == "history_truncated"
    # A new stream catches up over the bad entry too.
    late = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert ids_of(late.take(3)) == [0, 2]
    assert health(server)[0] == 200


def test_a_gap_trimmed_by_retention_while_pubsub_was_down_is_said_in_band(start_server, make_key, redis_client):
    server = start_server(EVENT_RETENTION="5")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    assert api.post(cid) == 0 and ids_of(stream.take(1)) == [0]
    # Written straight into Redis while the hub's pub/sub connection is down (it waits >= 50 ms
    # before reconnecting): 20 events, of which retention keeps the last 5.
    app = create_app({"REDIS_URL": server.env["REDIS_URL"], "TESTING": True, "EVENT_RETENTION": 5})
    store = app.extensions["store"]
    assert kill_pubsub(redis_client) >= 1
    for _ in range(20):
        store.append_event(None, cid, {"type": "user_message", "content": "x"}, source="user")
    close(app.extensions["redis"])
    got = stream.take(6, timeout=10)
    truncated = [ev for ev in got if ev.event == "history_truncated"]
    assert truncated and truncated[0].json() == {"earliest_event_id": 16}, [(e.event, e.id) for e in got]
    assert ids_of(got) == [16, 17, 18, 19, 20]


def test_a_stream_under_traffic_gets_no_ping(start_server, make_key):
    server = start_server(SSE_HEARTBEAT_SECONDS="1")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    seen = []
    deadline = time.monotonic() + 3.5
    n = 0
    while time.monotonic() < deadline:
        api.post(cid)
        n += 1
        seen.extend(itertools.islice(stream.events(timeout=0.3, comments=True), 1))
        time.sleep(0.25)  # a steady pace of events, each well within the heartbeat
    seen.extend(stream.take(n - len(ids_of(seen)), timeout=5))
    assert [ev.comment for ev in seen if ev.comment] == []
    assert ids_of(seen) == list(range(n))
    # Silence again: now the ping comes.
    assert next(stream.events(timeout=3, comments=True)).comment == "ping"


def test_a_client_that_sent_more_bytes_is_still_noticed_when_it_leaves(start_server, make_key):
    server = start_server(SSE_HEARTBEAT_SECONDS="60")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    stream.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined: never answered
    time.sleep(0.2)  # let the watcher see those bytes first (nothing else to wait on)
    assert health(server)[1]["streams"] == 1
    stream.close()
    # No write is due for 60 s: only the re-armed watcher can notice.
    wait_until(lambda: health(server)[1]["streams"] == 0, 5, what="the stream to be freed")


def test_following_and_leaving_many_conversations_leaves_nothing_behind(start_server, make_key, redis_client):
    server = start_server(SSE_MAX_STREAMS_PER_USER="0")
    api = Api(server.base, make_key("alice"))
    cids = [api.create() for _ in range(40)]
    stop = threading.Event()
    posted = {cid: 0 for cid in cids}

    def post() -> None:
        poster = Api(server.base, api.key)
        for cid in itertools.cycle(cids):
            if stop.is_set():
                return
            poster.post(cid)
            posted[cid] += 1

    poster = threading.Thread(target=post)
    poster.start()
    try:
        for round_ in range(50):  # 2,000 follows and leaves
            cid = cids[round_ % len(cids)]
            streams = [open_stream(server.port, SSE.format(c), bearer(api.key)) for c in (cid, cids[-1 - round_ % 40])]
            for s in streams:
                assert s.take(1)[0].event == "connection"
            snapshot = posted[cid]
            got = ids_of(streams[0].take(snapshot, timeout=10))
            assert got == list(range(len(got))) and len(got) >= snapshot - 1  # in order, nothing missed
            for s in streams:
                s.close()
    finally:
        stop.set()
        poster.join(10)
    wait_until(lambda: health(server)[1]["conversations"] == 0, 10, what="no conversation followed")
    body = health(server)[1]
    assert body["streams"] == 0 and body["channels"] == 0
    wait_until(lambda: redis_client.pubsub_channels("conv:*") == [], 10, what="no channel subscribed in Redis")


def test_readyz_says_503_when_the_hub_cannot_read_and_healthz_stays_200(server, api, redis_client):
    # Liveness is not readiness: a hub cut off from Redis is live (restarting it would not help).
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    assert health(server)[0] == 200 and health(server, "/readyz")[0] == 200
    redis_client.config_set("requirepass", "not-known-to-the-hub")
    try:
        kill_pubsub(redis_client)  # it cannot log in again; pooled connections stay logged in
        status, body = wait_until(lambda: (lambda h: h if h[0] == 503 else None)(health(server, "/readyz")), 10,
                                  what="/readyz to say 503")
        assert body["error"] in ("hub_not_reading", "redis_unavailable") and body["message"]
        assert health(server)[0] == 200
    finally:
        redis_client.config_set("requirepass", "")
    wait_until(lambda: health(server, "/readyz")[0] == 200, 10, what="/readyz back to 200")
    assert api.post(cid) == 0 and ids_of(stream.take(1)) == [0]


def test_options_in_the_redis_url_reach_the_pool_and_do_not_stop_the_hub(start_server, redis_server, make_key):
    url = redis_server.url + "?socket_timeout=5&health_check_interval=30&max_connections=50&protocol=2"
    server = start_server(redis_url=url)
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.status == 200 and stream.take(1)[0].event == "connection"
    assert api.post(cid) == 0 and ids_of(stream.take(1)) == [0]
