"""What the app believes of forwarded headers (ProxyFix, TRUSTED_PROXIES): a direct client's are ignored by default.

Through a real nginx, the Secure cookie and the client's address are tested in test_nginx.py.
"""
from __future__ import annotations

import httpx
import pytest

from app import create_app
from app.redis import close

from .conftest import bearer
from .nginx import CLIENT_ADDRESS, access_log_addresses, session_cookie_attributes
from .servers import wait_until


@pytest.mark.timeout(60)
def test_a_direct_clients_spoofed_forwarded_headers_are_ignored_by_default(start_server, make_key, tmp_path):
    log = tmp_path / "access-direct.log"
    server = start_server(ACCESS_LOG=str(log))  # TRUSTED_PROXIES and FORWARDED_ALLOW_IPS unset
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(base_url=server.base, transport=transport, timeout=10) as http:
        response = http.get("/api/conversations", headers={"X-Request-ID": "probe-direct",
            **bearer(make_key("alice")), "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Ssl": "on"})
    assert response.status_code == 200, response.text
    attributes = session_cookie_attributes(response)
    assert {"httponly", "samesite=lax", "path=/"} <= attributes and "secure" not in attributes
    assert wait_until(lambda: access_log_addresses(log, "probe-direct"), 10, what="the access log line") \
        == [CLIENT_ADDRESS]


def whoami_app(redis_url: str, **config: object):
    """The app with a route that shows what it believes of the request."""
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, **config})

    @app.get("/_whoami")
    def whoami() -> dict[str, object]:
        from flask import request
        return {"secure": request.is_secure, "remote_addr": request.remote_addr, "host": request.host}

    return app


ONE_PROXY = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "chat.example.com"}
# Each proxy appends its value; the rightmost is the innermost proxy's.
TWO_PROXIES = {"X-Forwarded-Proto": "https, http", "X-Forwarded-For": "203.0.113.7, 198.51.100.2",
               "X-Forwarded-Host": "chat.example.com, lb.internal"}


@pytest.mark.parametrize(("trusted", "headers", "expected"), [
    (0, ONE_PROXY, {"secure": False, "remote_addr": "192.0.2.10", "host": "app.internal:8000"}),
    (1, ONE_PROXY, {"secure": True, "remote_addr": "203.0.113.7", "host": "chat.example.com"}),
    (1, TWO_PROXIES, {"secure": False, "remote_addr": "198.51.100.2", "host": "lb.internal"}),
    (2, TWO_PROXIES, {"secure": True, "remote_addr": "203.0.113.7", "host": "chat.example.com"}),
    (2, ONE_PROXY, {"secure": False, "remote_addr": "192.0.2.10", "host": "app.internal:8000"}),
])
def test_trusted_proxies_decides_which_forwarded_values_are_believed(redis_server, redis_client, trusted, headers,
                                                                     expected):
    """Values are taken from the right, as many as there are trusted proxies; fewer than that: none."""
    app = whoami_app(redis_server.url, TRUSTED_PROXIES=trusted)
    try:
        response = app.test_client().get("/_whoami", headers={"Host": "app.internal:8000", **headers},
                                          environ_base={"REMOTE_ADDR": "192.0.2.10"})
    finally:
        close(app.extensions["redis"])
    assert response.get_json() == expected


def test_trusted_proxies_is_read_from_the_environment_and_bounded(monkeypatch):
    from app.config import ConfigError, load_settings

    assert load_settings({})["TRUSTED_PROXIES"] == 0
    assert load_settings({"TRUSTED_PROXIES": "1"})["TRUSTED_PROXIES"] == 1
    for bad in ("-1", "11", "one"):
        with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
            load_settings({"TRUSTED_PROXIES": bad})
