"""Every error is the JSON body of API.md: unknown paths, wrong methods, Redis down, unexpected failures."""
from __future__ import annotations

import socket
import time

import pytest

from app import create_app
from app.redis import close

from .conftest import assert_error, assert_no_trace, bearer, create
from .servers import RedisServer, wait_until


@pytest.fixture()
def cid(app, key) -> str:
    """A conversation of Alice's (made with a client of its own: `client` keeps no cookie from it)."""
    return app.test_client().post("/api/conversations", headers=bearer(key)).get_json()["conversation_id"]


# 404 and 405 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/",
    "/api",
    "/api/nothing",
    "/api/conversations/",
    "/api/conversations/x/y",
    "/api/conversations/x/events/1",
    "/api/sse",
    "/api/sse/conversations/x",
    "/api/v1/conversations",
])
@pytest.mark.parametrize("authenticated", [True, False])
def test_unknown_api_path_is_a_json_404(client, key, path, authenticated):
    assert client.get_cookie("oh_session") is None
    headers = bearer(key) if authenticated else {}
    assert_error(client.get(path, headers=headers), 404, "not_found")
    assert_error(client.post(path, headers=headers, json={}), 404, "not_found")


@pytest.mark.parametrize("path", ["/nothing", "/static/x.js", "/index.html"])  # "/" is the web app
def test_unknown_path_outside_the_api_is_a_json_404_too(client, path):
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/api/conversations", {"GET", "POST"}),
    ("DELETE", "/api/conversations", {"GET", "POST"}),
    ("PATCH", "/api/conversations/{cid}", {"GET", "DELETE"}),
    ("POST", "/api/conversations/{cid}", {"GET", "DELETE"}),
    ("PUT", "/api/conversations/{cid}/events", {"GET", "POST"}),
    ("DELETE", "/api/conversations/{cid}/events", {"GET", "POST"}),
    ("POST", "/api/sse/conversations/{cid}/events", {"GET"}),
    ("POST", "/healthz", {"GET"}),
])
@pytest.mark.parametrize("authenticated", [True, False])
def test_wrong_method_is_a_json_405(client, key, cid, method, path, allowed, authenticated):
    assert client.get_cookie("oh_session") is None
    response = client.open(path.format(cid=cid), method=method, headers=bearer(key) if authenticated else {},
                           json={"type": "x"})
    assert_error(response, 405, "method_not_allowed")
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}
    assert "Set-Cookie" not in response.headers


def test_a_405_changes_nothing(client, key, cid):
    client.put(f"/api/conversations/{cid}/events", headers=bearer(key), json={"type": "x"})
    client.post(f"/api/conversations/{cid}", headers=bearer(key))
    assert client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).get_json()["events"] == []


def test_options_needs_credentials_like_every_api_route(client, key, cid):
    """But for a real CORS preflight from a CORS_ORIGINS origin, which never carries them (tests/test_cors.py)."""
    assert_error(client.options(f"/api/conversations/{cid}"), 401, "unauthorized")
    # Views that check their caller themselves too: Flask answers their OPTIONS without running them.
    for path in (f"/api/sse/conversations/{cid}/events", f"/api/conversations/{cid}/events",
                 "/api/conversations", "/api/session"):
        assert_error(client.options(path), 401, "unauthorized")
    assert_error(client.options(f"/api/conversations/{cid}", headers={  # CORS_ORIGINS is empty here
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"}), 401, "unauthorized")
    response = client.options(f"/api/conversations/{cid}", headers=bearer(key))
    assert response.status_code == 200
    assert {"GET", "DELETE"} <= {m.strip() for m in response.headers["Allow"].split(",")}
    assert response.data == b""


# Client mistakes are never a 500 --------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/api/conversations?limit=%ff", {}, 400),
    ("GET", "/api/conversations?page_id=%ff%fe", {}, 400),
    ("GET", "/api/conversations/{cid}/events?start_id=%ff", {}, 400),
    ("GET", "/api/conversations/{cid}/events?limit=-" + "9" * 5000, {}, 400),  # a huge positive one is clamped
    ("GET", "/api/conversations/" + "x" * 5000, {}, 404),
    ("GET", "/api/conversations/%7B%7D", {}, 404),
    ("GET", "/api/conversations/%2A", {}, 404),
    ("GET", "/api/conversations/%ff", {}, 404),
    ("GET", "/api/conversations/%00/events", {}, 404),
    ("POST", "/api/conversations/%ff%00/events", {"json": {"type": "x"}}, 404),
    ("DELETE", "/api/conversations/%2A", {}, 404),
    ("POST", "/api/conversations", {"data": b"\xff\xfe\xfd", "content_type": "application/json"}, 400),
    ("POST", "/api/conversations", {"data": b"{}", "content_type": "application/json; charset=latin-1"}, 200),
    ("POST", "/api/conversations", {"data": b"{}", "content_type": "invalid"}, 415),
    ("POST", "/api/conversations/{cid}/events", {"data": b'{"type":"x","a":1e999}',
                                                 "content_type": "application/json"}, 400),
    ("POST", "/api/conversations/{cid}/events", {"data": b'{"type":"x","a":"\\udc00"}',
                                                 "content_type": "application/json"}, 400),
    # Refused rather than rounded to a float: posted fields are kept exactly as posted.
    ("POST", "/api/conversations/{cid}/events", {"data": b'{"type":"x","a":123456789012345678901234567890}',
                                                 "content_type": "application/json"}, 400),
    ("POST", "/api/conversations/{cid}/events",
     {"data": b'{"type":"x","a":18446744073709551615,"b":-9223372036854775808}', "content_type": "application/json"},
     200),
    ("POST", "/api/conversations/{cid}/events", {"data": b'{"type":"x","a":' + b'[' * 300 + b']' * 300 + b'}',
                                                 "content_type": "application/json"}, 400),
    ("POST", "/api/conversations/{cid}/events", {"data": b'{"type":"x","\\u0000":"\\u0000"}',
                                                 "content_type": "application/json"}, 200),
    ("POST", "/api/conversations/{cid}/events", {"json": {"type": "x"}, "headers": {"Idempotency-Key": "\x7f"}},
     400),
])
def test_client_mistakes_are_never_a_500(client, key, cid, method, path, kwargs, status):
    headers = {**bearer(key), **kwargs.pop("headers", {})}
    response = client.open(path.format(cid=cid), method=method, headers=headers, **kwargs)
    assert response.status_code == status, response.data
    assert_no_trace(response)
    if status >= 400:
        assert response.get_json()["status"] == "error"


# Unexpected failures ----------------------------------------------------------------------------


def test_an_unexpected_exception_is_a_json_500_without_details(app, client, key, caplog):
    @app.get("/api/boom")
    def boom():
        raise RuntimeError("secret internal detail /srv/app/module.py")

    response = client.get("/api/boom", headers=bearer(key))
    body = assert_error(response, 500, "internal_error")
    assert "secret" not in body["message"]
    assert "Set-Cookie" not in response.headers
    # The details go to the log instead.
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


def test_a_redis_error_that_is_not_an_outage_is_a_json_500(client, key, cid, redis_client):
    redis_client.delete(f"conv:{{{cid}}}:meta")
    redis_client.set(f"conv:{{{cid}}}:meta", "not a hash")  # WRONGTYPE for every command on it
    body = assert_error(client.get(f"/api/conversations/{cid}", headers=bearer(key)), 500, "internal_error")
    assert "WRONGTYPE" not in body["message"]


# Redis unreachable ------------------------------------------------------------------------------


def every_route() -> list[tuple[str, str, dict]]:
    """(method, path, kwargs) of every API route."""
    return [
        ("GET", "/api/conversations", {}),
        ("POST", "/api/conversations", {"json": {"initial_user_msg": "hi"}}),
        ("GET", "/api/conversations/abc", {}),
        ("DELETE", "/api/conversations/abc", {}),
        ("POST", "/api/conversations/abc/events", {"json": {"type": "user_message", "content": "x"}}),
        ("GET", "/api/conversations/abc/events", {}),
        ("GET", "/api/sse/conversations/abc/events", {}),
        ("GET", "/readyz", {}),  # /healthz is liveness: it does not ask Redis (test_healthz_is_200_without_redis)
    ]


def assert_503(response) -> None:
    """Redis is unreachable: 503, JSON, Retry-After."""
    assert_error(response, 503, "redis_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert "Set-Cookie" not in response.headers


@pytest.fixture()
def down_app():
    """The app with Redis on a port where nobody listens."""
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_TIMEOUT_SECONDS": 0.3, "TESTING": True})
    yield app
    close(app.extensions["redis"])


def test_redis_unreachable_is_503_on_every_route(down_app, app, make_key):
    key = make_key("alice")  # a real key, from the working Redis
    client = down_app.test_client()
    for method, path, kwargs in every_route():
        started = time.monotonic()
        assert_503(client.open(path, method=method, headers=bearer(key), **kwargs))
        assert time.monotonic() - started < 3


def test_redis_unreachable_with_a_cookie_is_503(down_app, app, make_key):
    key = make_key("alice")
    cookie = app.test_client().get("/api/conversations", headers=bearer(key)).headers["Set-Cookie"]
    client = down_app.test_client()
    client.set_cookie("oh_session", cookie.split(";")[0].split("=", 1)[1])
    assert_503(client.get("/api/conversations"))


def test_redis_unreachable_without_credentials_is_still_401(down_app):
    response = down_app.test_client().get("/api/conversations")
    assert_error(response, 401, "unauthorized")


@pytest.fixture()
def silent_redis():
    """A TCP port that accepts connections and never answers: a hung Redis."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_redis_that_does_not_answer_is_503(silent_redis, app, make_key):
    key = make_key("alice")
    hung = create_app({"REDIS_URL": silent_redis, "REDIS_TIMEOUT_SECONDS": 0.2, "TESTING": True})
    try:
        started = time.monotonic()
        assert_503(hung.test_client().get("/api/conversations", headers=bearer(key)))
        assert time.monotonic() - started < 3
    finally:
        close(hung.extensions["redis"])


def test_the_app_recovers_when_redis_is_back(tmp_path):
    """A real outage of a Redis of the test's own: 503s while it is down, then the same app (same pool) answers."""
    own = RedisServer(tmp_path / "redis-recovers", appendonly=True).start()  # the data survives its restart
    # The smallest pool: one connection lost to the outage (never given back) would show at once.
    app = create_app({"REDIS_URL": own.url, "REDIS_TIMEOUT_SECONDS": 0.5, "REDIS_POOL_SIZE": 2, "TESTING": True})
    pool = app.extensions["redis"].connection_pool
    try:
        key = app.extensions["store"].create_api_key("alice")[1]
        client = app.test_client()
        cid = create(client, key, initial_user_msg="before")
        assert client.get(f"/api/conversations/{cid}", headers=bearer(key)).status_code == 200

        own.stop()
        # Every route, with the key and with the cookie the client now holds, answers 503 at once.
        for method, path, kwargs in every_route() + [("GET", f"/api/conversations/{cid}/events", {})]:
            started = time.monotonic()
            assert_503(client.open(path, method=method, headers=bearer(key), **kwargs))
            assert time.monotonic() - started < 3, (method, path)
        assert_503(client.get(f"/api/conversations/{cid}"))  # the cookie alone

        own.start()  # the same port: the app is not told, its pool must find Redis again
        wait_until(lambda: client.get(f"/api/conversations/{cid}", headers=bearer(key)).status_code == 200, 10,
                   what="the app answering again")
        assert app.extensions["redis"].connection_pool is pool
        events = client.get(f"/api/conversations/{cid}/events", headers=bearer(key)).get_json()["events"]
        assert [e["content"] for e in events] == ["before"]
        posted = client.post(f"/api/conversations/{cid}/events", headers=bearer(key),
                             json={"type": "user_message", "content": "after"})
        assert posted.status_code == 200 and posted.get_json()["event_id"] == 1
        assert client.get(f"/api/conversations/{cid}").status_code == 200  # the cookie works again too
    finally:
        pool.disconnect()
        own.stop()


# Health -----------------------------------------------------------------------------------------


def test_healthz_is_200_without_redis(down_app):
    response = down_app.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json()["status"] == "ok"


def test_readyz_needs_no_credentials_and_says_ok_when_redis_answers(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert "Set-Cookie" not in response.headers


def test_healthz_needs_no_credentials(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["streams"] == 0
    assert "Set-Cookie" not in response.headers
