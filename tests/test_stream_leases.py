"""Stream slots under the per-user cap: every lease is given back or expires, whatever ends the stream."""
from __future__ import annotations

import http.client
import os
import signal

from .conftest import Api, bearer
from .servers import wait_until
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"


def leases(redis_client, user: str = "alice") -> int:
    """Slots the user holds now (leases not yet expired)."""
    return redis_client.zcount(f"user:{{{user}}}:streams", "-inf", "+inf")


def opens(server, api: Api, cid: str) -> int:
    """The status of a new stream (closed at once)."""
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    stream.close()
    return stream.status


def test_a_stream_asked_of_an_exiting_worker_takes_no_slot_and_ends_after_what_is_stored(
        start_server, make_key, redis_client):
    server = start_server(SSE_MAX_STREAMS_PER_USER="3", wsgi_app="tests.wsgi_test_hooks:app")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    api.post(cid)  # event 0
    following = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert following.take(2)[1].id == "0"
    assert leases(redis_client) == 1
    # The state of a worker told to exit that still gets a stream request (on a connection it held).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", SSE.format(cid), headers={**bearer(api.key), "X-Test-Close-Hub": "1"})
    answer = conn.getresponse()
    # A 200 that ends (a 503 would close a browser's EventSource for good): it reconnects.
    assert answer.status == 200 and answer.getheader("Connection") == "close"
    body = answer.read()  # returns: the stream ends by itself
    assert body.startswith(b"retry: ") and b"event: connection\n" in body
    assert b"id: 0\n" in body and b": ping" not in body  # what is stored, then the end
    conn.close()
    assert following.ended(3)  # the hub's own streams ended too
    wait_until(lambda: leases(redis_client) == 0, 5, what="every slot given back")


def test_a_stream_whose_response_never_starts_gives_its_slot_back(start_server, make_key, redis_client):
    server = start_server(SSE_MAX_STREAMS_PER_USER="1", wsgi_app="tests.wsgi_test_hooks:app")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    broken = open_stream(server.port, SSE.format(cid), {**bearer(api.key), "X-Test-Fail-After-Request": "1"})
    assert broken.status == 500
    assert opens(server, api, cid) == 429  # the view registered the stream and took the one slot
    # Past the hub's grace for a response to start (10 s) and its next check, the slot is free again.
    wait_until(lambda: leases(redis_client) == 0, 20, what="the never-started stream's lease to go")
    assert opens(server, api, cid) == 200


def test_a_killed_workers_slots_are_free_within_the_lease_time(start_server, make_key, redis_client):
    server = start_server(SSE_MAX_STREAMS_PER_USER="2", SSE_LEASE_SECONDS="4")
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    streams = [open_stream(server.port, SSE.format(cid), bearer(api.key)) for _ in range(2)]
    assert all(s.status == 200 for s in streams)
    old = server.worker_pids()[0]
    os.kill(old, signal.SIGKILL)
    assert all(s.ended(5) for s in streams)
    wait_until(lambda: (lambda pids: pids and pids[0] != old and server.healthy())(server.worker_pids()), 30,
               what="a new worker")
    held = leases(redis_client)
    assert held == 2 or opens(server, api, cid) == 200  # slow machine: the leases may already be gone
    # Nobody refreshes a killed worker's leases: they go within SSE_LEASE_SECONDS (4 s here).
    wait_until(lambda: opens(server, api, cid) == 200, 4 + 3, interval=0.2, what="a slot freed by the lease expiring")
