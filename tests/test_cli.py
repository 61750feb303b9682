"""The `keys` commands of the Flask CLI: create, list, revoke."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import create_app
from app.redis import close

from .conftest import bearer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def runner(app):
    """Flask's CLI runner on the app."""
    return app.test_cli_runner()


def create_key(runner, user: str = "alice") -> str:
    """`keys create USER`; the key it prints on its last line."""
    result = runner.invoke(args=["keys", "create", user])
    assert result.exit_code == 0, result.output
    return result.output.rstrip("\n").split("\n")[-1]


def works(app, key: str) -> bool:
    """Whether the key authenticates a request."""
    response = app.test_client().get("/api/conversations", headers=bearer(key))
    assert response.status_code in (200, 401), response.data
    return response.status_code == 200


def test_create_prints_the_key_alone_on_the_last_line(app, runner):
    result = runner.invoke(args=["keys", "create", "alice"])
    assert result.exit_code == 0, result.output
    lines = result.output.rstrip("\n").split("\n")
    key = lines[-1]
    assert key == key.strip() and " " not in key
    assert key.startswith("ohk_")
    assert key.split("_")[1] in lines[0]  # the key id is named above it
    assert works(app, key)


def test_the_key_is_the_users(app, runner):
    key = create_key(runner, "bob.smith@example.com")
    client = app.test_client()
    cid = client.post("/api/conversations", headers=bearer(key)).get_json()["conversation_id"]
    assert app.extensions["store"].conversation_owner(cid) == "bob.smith@example.com"


def test_every_create_makes_a_new_key(app, runner):
    one, two = create_key(runner), create_key(runner)
    assert one != two
    assert works(app, one) and works(app, two)


@pytest.mark.parametrize("user", ["", "a b", "x" * 65, "a{b}", "ü", "a/b", "a:b", "a\nb"])
def test_create_rejects_bad_user_ids(runner, redis_client, user):
    result = runner.invoke(args=["keys", "create", user])
    assert result.exit_code != 0
    assert "USER_ID" in result.output
    assert not list(redis_client.scan_iter("apikey:*"))


@pytest.mark.parametrize("user", ["a", "x" * 64, "A-z_0.9@x"])
def test_create_accepts_user_ids(app, runner, user):
    assert works(app, create_key(runner, user))


def test_list_never_prints_the_secret(runner):
    keys = [create_key(runner), create_key(runner)]
    create_key(runner, "bob")
    result = runner.invoke(args=["keys", "list", "alice"])
    assert result.exit_code == 0, result.output
    for key in keys:
        assert key.split("_")[1] in result.output
        assert key.split("_", 2)[2] not in result.output
    rows = result.output.strip().split("\n")
    assert "KEY ID" in rows[0]
    assert len(rows) == 3  # header and alice's two keys, not bob's
    assert all(row.endswith("active") for row in rows[1:])


def test_list_of_a_user_without_keys(runner):
    result = runner.invoke(args=["keys", "list", "nobody"])
    assert result.exit_code == 0
    assert result.output.strip() == "no keys for user nobody"


def test_revoke_by_key(app, runner):
    key, other = create_key(runner), create_key(runner)
    result = runner.invoke(args=["keys", "revoke", key])
    assert result.exit_code == 0, result.output
    assert key.split("_")[1] in result.output
    assert key.split("_", 2)[2] not in result.output
    assert not works(app, key)
    assert works(app, other)
    listing = runner.invoke(args=["keys", "list", "alice"]).output
    [revoked_row] = [row for row in listing.split("\n") if key.split("_")[1] in row]
    assert "revoked 20" in revoked_row  # with its date


def test_revoke_by_key_id(app, runner):
    key = create_key(runner)
    key_id = key.split("_")[1]
    assert works(app, key)
    result = runner.invoke(args=["keys", "revoke", key_id])
    assert result.exit_code == 0, result.output
    assert not works(app, key)


def test_revoke_ends_the_cookie_too(app, runner):
    key = create_key(runner)
    browser = app.test_client()
    assert browser.get("/api/conversations", headers=bearer(key)).status_code == 200
    assert browser.get("/api/conversations").status_code == 200  # the cookie alone
    assert runner.invoke(args=["keys", "revoke", key]).exit_code == 0
    assert browser.get("/api/conversations").status_code == 401


def test_revoking_twice_keeps_the_first_date(app, runner):
    key = create_key(runner)
    key_id = key.split("_")[1]
    assert runner.invoke(args=["keys", "revoke", key_id]).exit_code == 0
    first = app.extensions["store"].get_api_key(key_id)["revoked_at"]
    result = runner.invoke(args=["keys", "revoke", key])
    assert result.exit_code == 0
    assert app.extensions["store"].get_api_key(key_id)["revoked_at"] == first
    assert not works(app, key)


@pytest.mark.parametrize("key", ["nope", "0123456789abcdef", "ohk_0123456789abcdef_secret", ""])
def test_revoke_unknown_key_fails(runner, key):
    create_key(runner)
    result = runner.invoke(args=["keys", "revoke", key])
    assert result.exit_code != 0
    assert "no such key" in result.output


def test_commands_say_when_redis_is_unreachable():
    app = create_app({"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0", "REDIS_TIMEOUT_SECONDS": 0.3})
    try:
        for args in (["keys", "create", "alice"], ["keys", "list", "alice"], ["keys", "revoke", "x"]):
            result = app.test_cli_runner().invoke(args=args)
            assert result.exit_code == 1
            assert "cannot reach Redis" in result.output
            assert "hunter2" not in result.output
            assert "***" in result.output
            assert "Traceback" not in result.output
    finally:
        close(app.extensions["redis"])


def test_the_real_flask_command(app, redis_server):
    """`flask --app wsgi keys create alice` as an operator runs it, from the project root."""
    flask = Path(sys.executable).parent / "flask"
    env = {**os.environ, "REDIS_URL": redis_server.url}
    env.pop("FLASK_APP", None)
    done = subprocess.run([str(flask), "--app", "wsgi", "keys", "create", "alice"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.rstrip("\n").split("\n")[-1]
    assert key.startswith("ohk_")
    assert works(app, key)
    assert app.extensions["store"].get_api_key(key.split("_")[1])["user_id"] == "alice"


def test_revoke_with_a_mistyped_secret_revokes_nothing(app):
    runner = app.test_cli_runner()
    key = runner.invoke(args=["keys", "create", "alice"]).output.strip().splitlines()[-1]
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    result = runner.invoke(args=["keys", "revoke", wrong])
    assert result.exit_code != 0 and "no such key" in result.output
    assert not app.extensions["store"].get_api_key(key.split("_")[1]).get("revoked_at")
    assert runner.invoke(args=["keys", "revoke", key]).exit_code == 0
    assert app.extensions["store"].get_api_key(key.split("_")[1]).get("revoked_at")
