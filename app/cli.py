"""Flask commands: API keys (create, list, revoke, sign-out)."""
from __future__ import annotations

import hmac

import click
import redis
from flask import current_app
from flask.cli import with_appcontext

from .auth import revoke_cookies, split_key
from .config import redacted_url
from .key_store import hash_secret
from .store import Store
from .validation import USER_ID


def _store() -> Store:
    store: Store = current_app.extensions["store"]
    try:
        store.redis.ping()
    except redis.RedisError as err:
        url = redacted_url(current_app.config["REDIS_URL"])
        raise click.ClickException(
            f"cannot reach Redis at {url} ({type(err).__name__}). Start the service first "
            "(python3 run.py), or set REDIS_URL to your Redis."
        ) from None
    return store


def _failed(err: redis.RedisError, what: str, advice: str) -> click.ClickException:
    """A clear error for a Redis failure in the middle of a command (no traceback, no secret)."""
    return click.ClickException(f"Redis failed while {what} ({type(err).__name__}); {advice}")


@click.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.argument("user_id")
@with_appcontext
def create_key(user_id: str) -> None:
    """Create an API key for USER_ID and print it (alone on the last line)."""
    if not USER_ID.fullmatch(user_id):
        raise click.BadParameter("1 to 64 characters of A-Z a-z 0-9 _ . @ -", param_hint="USER_ID")
    store = _store()
    try:
        key_id, key = store.create_api_key(user_id)
    except redis.RedisError as err:
        # The write may have run: a key nobody was shown would still work, so say how to find it.
        raise _failed(err, "storing the new key", f"it may have been stored without being shown: run "
                      f"`keys list {user_id}` and revoke any key id you do not know") from None
    click.echo(f"Created API key {key_id} for user {user_id}. It is shown only now; keep it secret:")
    click.echo(key)


@keys.command("list")
@click.argument("user_id")
@with_appcontext
def list_keys(user_id: str) -> None:
    """List USER_ID's keys (ids and dates, never the secret)."""
    try:
        rows = _store().list_api_keys(user_id)
    except redis.RedisError as err:
        raise _failed(err, "listing the keys", "run it again") from None
    if not rows:
        click.echo(f"no keys for user {user_id}")
        return
    click.echo(f"{'KEY ID':<18} {'CREATED':<33} STATUS")
    for row in rows:
        status = f"revoked {row['revoked_at']}" if row.get("revoked_at") else "active"
        click.echo(f"{row['key_id']:<18} {row['created_at']:<33} {status}")


def _key_id(store: Store, key: str) -> str:
    """The key id of KEY (the key itself, which must match what is stored, or its id)."""
    key_id = split_key(key)
    if key_id is None:
        return key
    # A whole key must match what is stored: a mistyped secret revokes nothing.
    record = store.get_api_key(key_id)
    if not record or not hmac.compare_digest(record["hash"], hash_secret(key)):
        raise click.ClickException("no such key")
    return key_id


@keys.command("revoke")
@click.argument("key")
@with_appcontext
def revoke_key(key: str) -> None:
    """Revoke KEY (the key itself, or its id as `keys list` shows it)."""
    store = _store()
    try:
        key_id = _key_id(store, key)
        revoked = store.revoke_api_key(key_id)
    except redis.RedisError as err:
        raise _failed(err, "revoking the key", "run it again (revoking twice is harmless)") from None
    if not revoked:
        raise click.ClickException("no such key")
    click.echo(f"revoked key {key_id}")


@keys.command("sign-out")
@click.argument("key")
@with_appcontext
def sign_out_key(key: str) -> None:
    """Sign KEY out of every browser: the session cookies it minted so far stop working (the key does not)."""
    store = _store()
    try:
        key_id = _key_id(store, key)
        found = revoke_cookies(key_id)
    except redis.RedisError as err:
        raise _failed(err, "signing the key out", "run it again (signing out twice is harmless)") from None
    if not found:
        raise click.ClickException("no such key")
    click.echo(f"signed key {key_id} out of every browser")
