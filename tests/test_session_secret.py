"""The cookie-signing secret: stable across workers and servers whatever happens to Redis, no I/O per cookie."""
from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app import create_app
from app.auth import COOKIE_NAME
from app.config import ConfigError, secret_from_file
from app.redis import close

from .conftest import bearer


def mint_cookie(base: str, key: str) -> str:
    """The session cookie a Bearer request to a running server sets."""
    req = urllib.request.Request(base + "/api/conversations", headers=bearer(key))
    with urllib.request.urlopen(req, timeout=10) as resp:
        header = next(v for k, v in resp.headers.items() if k.lower() == "set-cookie" and v.startswith(COOKIE_NAME))
    return header.split(";", 1)[0].split("=", 1)[1]


def status_with_cookie(base: str, cookie: str) -> int:
    """The status of a cookie-only request."""
    req = urllib.request.Request(base + "/api/conversations", headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_servers_started_after_redis_lost_everything_accept_each_others_cookies(
        start_server, redis_client, tmp_path, make_key):
    """A Redis without persistence restarting (here FLUSHALL) must not give a new server another secret."""
    env = {"SECRET_KEY": "", "SECRET_KEY_FILE": str(tmp_path / "secret_key")}
    first = start_server(**env)
    assert status_with_cookie(first.base, mint_cookie(first.base, make_key("alice"))) == 200
    redis_client.flushall()
    second = start_server(**env)
    key = make_key("alice")
    for minted_by, used_on in ((first, second), (second, first)):
        assert status_with_cookie(used_on.base, mint_cookie(minted_by.base, key)) == 200
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_minting_the_cookie_sends_nothing_to_redis(app, client, key, redis_client):
    """The cookie step runs after a post is stored: it must not be able to fail on Redis."""
    store = app.extensions["store"]
    cid = store.new_conversation_id()
    store.create_conversation("alice", cid, repository=None, branch=None, title="t", initial_user_msg=None)
    redis_client.config_resetstat()  # this post is the app's first request: its first cookie
    response = client.post(f"/api/conversations/{cid}/events", headers=bearer(key),
                           json={"type": "user_message", "content": "hi"})
    assert response.status_code == 200
    assert COOKIE_NAME in response.headers["Set-Cookie"]
    commands = set(redis_client.info("commandstats"))
    # The key lookup and the append script (with what it calls); the old code read or made the
    # secret here, with SET NX and GET.
    assert {"cmdstat_hgetall", "cmdstat_evalsha"} <= commands
    assert not commands & {"cmdstat_get", "cmdstat_set", "cmdstat_setnx", "cmdstat_getex"}, commands


def test_workers_making_the_secret_at_once_agree(tmp_path):
    path = tmp_path / "var" / "secret_key"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(secret_from_file(path))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(found) == 16 and len(set(found)) == 1 and len(found[0]) >= 48
    assert [p.name for p in path.parent.iterdir()] == ["secret_key"]  # no temporary file left


def test_an_unusable_secret_file_stops_the_start_with_a_clear_error(redis_server, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app({"REDIS_URL": redis_server.url, "SECRET_KEY": "", "SECRET_KEY_FILE": str(not_a_dir / "secret")})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        create_app({"REDIS_URL": redis_server.url, "SECRET_KEY": "", "SECRET_KEY_FILE": str(empty)})


def test_a_configured_secret_key_needs_no_file(redis_server, tmp_path):
    path = tmp_path / "never"
    app = create_app({"REDIS_URL": redis_server.url, "SECRET_KEY": "configured", "SECRET_KEY_FILE": str(path)})
    close(app.extensions["redis"])
    assert not Path(path).exists()

