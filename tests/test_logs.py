"""Logs of a real gunicorn (JSON, access log on, debug): a line per request and stream end, and never a secret."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from app.auth import KEY_ID_LEN
from app.key_store import KEY_PREFIX

from .conftest import Api
from .servers import wait_until
from .sse_client import open_stream


def call(base: str, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, dict]:
    """(status, headers) of one request."""
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_a_full_flow_logs_each_request_and_stream_end_and_no_key_or_cookie(start_server, app, make_key):
    server = start_server(ACCESS_LOG="-", LOG_FORMAT="json", LOG_LEVEL="debug")
    store = app.extensions["store"]
    keys = [make_key("alice"), make_key("alice"), make_key("bob")]
    alice, revoked, bob = keys
    base = server.base
    # Sign in with the key: the session cookie; then use the cookie alone.
    status, headers = call(base, "POST", "/api/session", {"Authorization": f"Bearer {alice}"})
    assert status == 200
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert call(base, "GET", "/api/session", {"Cookie": cookie})[0] == 200
    json_headers = {"Cookie": cookie, "Content-Type": "application/json", "X-Request-ID": "flow-42"}
    status, headers = call(base, "POST", "/api/conversations", json_headers, b"{}")
    assert status == 200 and headers["X-Request-ID"] == "flow-42"
    api = Api(base, alice)
    cid = api.create()
    # A stream with a key that is then revoked, and one that reads posted events.
    revoked_stream = open_stream(server.port, f"/api/sse/conversations/{Api(base, revoked).create()}/events",
                                 {"Authorization": f"Bearer {revoked}"})
    stream = open_stream(server.port, f"/api/sse/conversations/{cid}/events", {"Authorization": f"Bearer {alice}"})
    assert revoked_stream.status == stream.status == 200
    api.post(cid, type="user_message", content="hello")
    assert [ev.id for ev in stream.take(2) if ev.id is not None] == ["0"]
    store.revoke_api_key(revoked.split("_")[1])
    assert revoked_stream.ended(10)
    # Bad keys: a wrong secret, garbage, a revoked key, and keys where they never belong (the URL).
    wrong = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    for bad in (wrong, "ohk_not-a-key", revoked):
        assert call(base, "GET", "/api/conversations", {"Authorization": f"Bearer {bad}"})[0] == 401
    assert call(base, "GET", f"/api/conversations?api_key={bob}&token={bob}", {})[0] == 401
    assert call(base, "GET", f"/api/conversations?key={bob}", {"Authorization": f"Bearer {bob}"})[0] == 200
    lost = open_stream(server.port, f"/api/sse/conversations/{cid}/events?api_key={bob}", {"Referer": f"/?k={bob}"})
    assert lost.status == 401
    stream.close()
    wait_until(lambda: server.log().count('"event":"stream_end"') >= 2, 10, what="both stream ends logged")
    server.stop()  # every line written

    log = server.log()
    secrets = [*keys, wrong, cookie, cookie.split("=", 1)[1]]
    # The secret part alone (ohk_<16 hex id>_<secret>; the secret itself may hold "_").
    secrets += [key[len(KEY_PREFIX) + KEY_ID_LEN + 1:] for key in keys]
    for secret in secrets:
        assert secret not in log, f"a secret ({secret[:8]}...) is in the log"
    app_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests = [line for line in app_lines if line.get("logger") == "app.request"]
    assert {"method", "route", "status", "duration_ms", "request_id"} <= set(requests[0])
    flow = [line for line in requests if line["request_id"] == "flow-42"]
    assert flow and flow[0]["route"] == "/api/conversations" and flow[0]["user_id"] == "alice"
    assert any(line["status"] == 401 and "user_id" in line for line in requests)
    ends = {line["reason"]: line for line in app_lines if line.get("event") == "stream_end"}
    assert set(ends) >= {"revoked"} and ends["revoked"]["conversation_id"] and ends["revoked"]["request_id"]
    closed = [line for line in ends.values() if line["conversation_id"] == cid]
    assert closed and closed[0]["events_sent"] == 1 and closed[0]["duration_ms"] > 0
    # gunicorn's access lines are there, with the path and the request id but no query string.
    access = [line for line in log.splitlines() if '"GET /api/conversations HTTP/1.1" 401' in line]
    assert access and "?" not in "".join(access)
    assert any(line.endswith(" flow-42") for line in log.splitlines())
