"""GET /metrics summed over a real 2-worker gunicorn, who may read it, /readyz, and an agent worker's metrics."""
from __future__ import annotations

import json
import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.metrics import is_loopback

from .agent_workers import AgentWorker
from .conftest import Api
from .servers import free_port, wait_until
from .sse_client import open_stream


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def health(base: str) -> dict:
    """/healthz of whichever worker answers (a new connection each time)."""
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        return json.loads(resp.read())


def test_metrics_sum_over_two_workers(start_server, make_key):
    server = start_server(workers=2)
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    path = f"/api/sse/conversations/{cid}/events"
    auth = {"Authorization": f"Bearer {api.key}"}
    streams, seen = [], {}
    # Streams until both workers hold some (the kernel decides which worker accepts a connection).
    while len(streams) < 40 and not (len(seen) == 2 and all(seen.values())):
        streams.append(open_stream(server.port, path, auth))
        assert streams[-1].status == 200
        for _ in range(10):
            answer = health(server.base)
            seen[answer["worker_pid"]] = answer["streams"]
    assert len(seen) == 2 and all(seen.values()), seen
    metrics_url = server.base + "/metrics"
    wait_until(lambda: value(scrape(metrics_url), "openhands_open_streams") == len(streams), 10,
               what="open streams to be counted")

    posted = 5
    for n in range(posted):
        api.post(cid, type="user_message", content=f"m{n}")
    for stream in streams:
        ids = [ev.id for ev in stream.take(posted + 1) if ev.id is not None]
        assert ids[-posted:] == [str(n) for n in range(posted)]

    def sums_right() -> bool:
        samples = scrape(metrics_url)
        return (value(samples, "openhands_events_appended_total", source="user") == posted
                and value(samples, "openhands_events_delivered_total") == posted * len(streams)
                and value(samples, "openhands_http_request_duration_seconds_count",
                          route="/api/conversations/<cid>/events", method="POST") == posted)
    wait_until(sums_right, 10, what="appended, delivered and request counts")

    for stream in streams:
        stream.close()
    wait_until(lambda: value(scrape(metrics_url), "openhands_open_streams") == 0, 10, what="open streams back to 0")
    samples = scrape(metrics_url)
    assert value(samples, "openhands_stream_ends_total") == len(streams)
    assert value(samples, "openhands_http_requests_total", route="/api/sse/conversations/<cid>/events",
                 status="200") == len(streams)
    assert value(samples, "openhands_hub_read_lag_seconds_count") >= 1
    assert 0 <= value(samples, "openhands_hub_read_lag_seconds_sum") < 5 * posted


def test_a_dead_worker_no_longer_counts_its_streams(start_server, make_key):
    server = start_server(workers=1)
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, f"/api/sse/conversations/{cid}/events", {"Authorization": f"Bearer {api.key}"})
    assert stream.status == 200
    metrics_url = server.base + "/metrics"
    wait_until(lambda: value(scrape(metrics_url), "openhands_open_streams") == 1, 10, what="the stream counted")
    (pid,) = server.worker_pids()
    import os
    import signal
    os.kill(pid, signal.SIGKILL)  # no goodbye: child_exit in the master marks it dead
    wait_until(lambda: server.worker_pids() and server.worker_pids() != [pid] and server.healthy(), 30,
               what="a new worker")
    wait_until(lambda: value(scrape(metrics_url), "openhands_open_streams") == 0, 10, what="the dead one forgotten")
    # Its counters stay: the conversation's creation was counted by the dead worker.
    assert value(scrape(metrics_url), "openhands_http_requests_total", route="/api/conversations") >= 1


def test_metrics_refuse_non_loopback_callers_unless_they_bring_the_token(app):
    app.config["METRICS_TOKEN"] = "s3cret-token-of-16+chars"
    client = app.test_client()
    outside = {"REMOTE_ADDR": "10.0.0.5"}
    assert client.get("/metrics").status_code == 200  # the test client's address is 127.0.0.1
    refused = client.get("/metrics", environ_base=outside)
    assert refused.status_code == 404 and refused.get_json()["error"] == "not_found"
    wrong = client.get("/metrics", environ_base=outside, headers={"Authorization": "Bearer s3cret-token-of-16+charz"})
    assert wrong.status_code == 404
    good = client.get("/metrics", environ_base=outside, headers={"Authorization": "Bearer s3cret-token-of-16+chars"})
    assert good.status_code == 200 and b"openhands_open_streams" in good.data
    app.config["METRICS_TOKEN"] = ""
    assert client.get("/metrics", environ_base=outside,
                      headers={"Authorization": "Bearer "}).status_code == 404  # no token set: none is good


def test_a_forwarded_loopback_address_does_not_make_a_direct_caller_local(redis_server):
    # TRUSTED_PROXIES: ProxyFix puts the last X-Forwarded-For value in REMOTE_ADDR, a value any
    # client reaching gunicorn directly writes itself; only the socket's peer says it is local.
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True, "TRUSTED_PROXIES": 1,
                      "METRICS_TOKEN": "s3cret-token-of-16+chars"})
    client = app.test_client()
    forged = {"X-Forwarded-For": "127.0.0.1"}
    refused = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.0.0.5"}, headers=forged)
    assert refused.status_code == 404 and refused.get_json()["error"] == "not_found"
    # A real loopback peer (a local proxy) is local whatever client it forwards.
    local = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}, headers={"X-Forwarded-For": "10.0.0.5"})
    assert local.status_code == 200
    with_token = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.0.0.5"},
                            headers={**forged, "Authorization": "Bearer s3cret-token-of-16+chars"})
    assert with_token.status_code == 200 and b"openhands_open_streams" in with_token.data


def test_stream_end_reasons_are_counted_from_zero_before_any_stream(redis_server):
    # A labelled series starts at its first count: rate() would miss each reason's first end.
    app = create_app({"REDIS_URL": redis_server.url, "TESTING": True})
    text = app.test_client().get("/metrics").get_data(as_text=True)
    for reason in ("closed", "deleted", "disconnected", "overflow", "revoked", "shutdown"):
        assert f'openhands_stream_ends_total{{reason="{reason}"}}' in text, reason
    # 0.0 in a fresh process (whatever an earlier in-process test counted otherwise).
    counted = REGISTRY.get_sample_value("openhands_stream_ends_total", {"reason": "revoked"}) or 0.0
    assert f'openhands_stream_ends_total{{reason="revoked"}} {counted!r}' in text


def test_loopback_is_127_0_0_0_slash_8_and_ipv6_loopback():
    for address in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("10.0.0.5", "192.168.1.1", "::ffff:10.0.0.5", "2001:db8::1", "", None, "localhost"):
        assert not is_loopback(address), address


def test_request_ids_are_echoed_when_valid_and_made_otherwise(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123.x"}).headers["X-Request-ID"] == "abc-123.x"
    for bad in ("a" * 129, "has space", "quote\"", "ünï"):
        made = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert made != bad and len(made) == 32
    assert len(client.get("/nowhere").headers["X-Request-ID"]) == 32


def test_readyz_on_a_real_server(server):
    with urllib.request.urlopen(server.base + "/readyz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


def test_an_agent_worker_serves_its_own_metrics(redis_server, redis_client, tmp_path, start_server, make_key):
    server = start_server()
    api = Api(server.base, make_key("alice"))
    port = free_port()
    worker = AgentWorker(redis_server.url, tmp_path / "agent.log", AGENT="echo", AGENT_METRICS_PORT=str(port)).start()
    try:
        cid = api.create()
        api.post(cid, type="user_message", content="hello")
        url = f"http://127.0.0.1:{port}/metrics"

        def answered() -> dict | None:
            samples = scrape(url)
            done = value(samples, "openhands_agent_actions_total", agent="echo", outcome="awaiting_user_input")
            return samples if done == 1 else None
        samples = wait_until(answered, 20, what="the agent's answer counted")
        assert value(samples, "openhands_agent_action_duration_seconds_count", agent="echo") == 1
        assert value(samples, "openhands_events_appended_total", source="agent") >= 1
    finally:
        assert worker.stop() == 0
