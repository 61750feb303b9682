"""/healthz (liveness: the hub's loops run), /readyz (readiness: Redis answers, the hub reads): the test client."""
from __future__ import annotations

import os

import gevent

from app.api import get_store
from app.hub import Hub

from .conftest import assert_error


class StubListener:
    def __init__(self) -> None:
        self.wanted = {b"conv:a"}
        self.serving = True
        self.loops_alive = True

    def alive(self) -> bool:
        return self.loops_alive


class StubHub:
    """What the probes read of a hub; `pid` says it was started in this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.closing = False
        self.listener = StubListener()
        self.conversations = {"a": object()}
        self.stream_count = 3
        self.greenlets_alive = True

    def running(self) -> bool:
        return self.greenlets_alive and self.listener.alive()

    def reading(self) -> bool:
        return self.running() and self.listener.serving


def test_healthz_stays_200_while_the_hubs_pubsub_connection_is_down(app):
    hub = app.extensions["hub"] = StubHub()
    hub.listener.serving = False  # Redis down: not a reason to restart this process
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["worker_pid"] == os.getpid()
    assert (body["streams"], body["conversations"], body["channels"]) == (3, 1, 1)


def test_healthz_is_503_once_a_hub_loop_is_dead(app):
    hub = app.extensions["hub"] = StubHub()
    hub.greenlets_alive = False
    assert_error(app.test_client().get("/healthz"), 503, "hub_not_running")
    hub.greenlets_alive, hub.listener.loops_alive = True, False
    assert_error(app.test_client().get("/healthz"), 503, "hub_not_running")
    hub.listener.loops_alive = True
    assert app.test_client().get("/healthz").status_code == 200


def test_a_hub_of_another_process_is_not_this_workers(app):
    hub = app.extensions["hub"] = StubHub()
    hub.pid, hub.greenlets_alive, hub.listener.serving = -1, False, False  # a forked worker's copy
    assert app.test_client().get("/healthz").status_code == 200
    assert app.test_client().get("/readyz").status_code == 200


def test_readyz_is_503_while_the_hub_does_not_receive_announcements(app):
    hub = app.extensions["hub"] = StubHub()
    assert app.test_client().get("/readyz").status_code == 200
    hub.listener.serving = False
    response = app.test_client().get("/readyz")
    assert_error(response, 503, "hub_not_reading")
    assert response.headers["Retry-After"] == "1"
    hub.listener.serving = True
    hub.closing = True
    assert_error(app.test_client().get("/readyz"), 503, "shutting_down")


def test_a_hub_is_running_until_one_of_its_greenlets_is_dead(app):
    with app.app_context():
        hub = Hub(app.config["REDIS_URL"], get_store(), queue_max=100, stream_cap=0)
    # Not under gevent's patched sockets: nothing here yields, so no greenlet has started; killing an
    # unstarted greenlet marks it dead without running it.
    loops = hub._greenlets + hub.listener._greenlets
    try:
        assert hub.running() and not hub.reading()  # no pub/sub connection yet
        gevent.kill(hub._greenlets[0])
        assert hub._greenlets[0].dead and not hub.running()
    finally:
        gevent.killall(loops)
        hub._control.close()
    assert not hub.running()
