"""API keys, the session cookie, the current user."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, current_app, g, request
from itsdangerous import BadSignature, TimestampSigner

from .config import secret_from_file
from .errors import Unauthorized
from .store import KEY_PREFIX, hash_secret

COOKIE_NAME = "oh_session"
KEY_ID_LEN = 16


@dataclass(frozen=True)
class Caller:
    """Who makes the request, and which API key proves it."""

    user_id: str
    key_id: str
    via: str  # "bearer" or "cookie"


def split_key(key: str) -> str | None:
    """The key id inside an API key (`ohk_<16 hex>_<secret>`), None if it is not shaped like one."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id = key[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_ID_LEN]
    rest = key[len(KEY_PREFIX) + KEY_ID_LEN:]
    if len(key_id) != KEY_ID_LEN or not rest.startswith("_") or len(rest) < 2:
        return None
    try:
        int(key_id, 16)
    except ValueError:
        return None
    return key_id


def _signer() -> TimestampSigner:
    return current_app.extensions["session_signer"]


def _active_key(key_id: str) -> dict[str, str] | None:
    record = current_app.extensions["store"].get_api_key(key_id)
    if not record or record.get("revoked_at"):
        return None
    return record


def authenticate() -> Caller:
    """The caller of this request, from a Bearer key or else the session cookie; 401 otherwise."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, key = header.partition(" ")
        key = key.strip()
        key_id = split_key(key) if scheme.lower() == "bearer" else None
        record = _active_key(key_id) if key_id else None
        # Compared in constant time even though the record was found by the key id.
        if record is None or not hmac.compare_digest(record["hash"], hash_secret(key)):
            raise Unauthorized("missing or invalid credentials")
        return Caller(record["user_id"], key_id, "bearer")
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        try:
            key_id = _signer().unsign(cookie, max_age=current_app.config["SESSION_MAX_AGE_SECONDS"]).decode()
        except BadSignature:
            key_id = None
        record = _active_key(key_id) if key_id else None
        if record is not None:
            return Caller(record["user_id"], key_id, "cookie")
    raise Unauthorized("missing or invalid credentials")


def current_caller() -> Caller:
    """The authenticated caller of this request (authenticating it on first use)."""
    caller = g.get("caller")
    if caller is None:
        caller = g.caller = authenticate()
    return caller


def init_app(app: Flask) -> None:
    """Authenticate every /api request; mint the session cookie on 2xx answers to Bearer callers."""
    # Made once, at start: minting a cookie then needs no I/O, so it cannot fail after a request
    # has stored something (and the signer derives its key from the secret only once).
    secret = app.config["SECRET_KEY"] or secret_from_file(Path(app.config["SECRET_KEY_FILE"]))
    app.extensions["session_signer"] = TimestampSigner(secret, salt="oh-session")

    @app.before_request
    def _require_caller() -> None:
        if request.path.startswith("/api/") and request.endpoint is not None:
            current_caller()

    @app.after_request
    def _session_cookie(response: Response) -> Response:
        caller = g.get("caller")
        if caller is not None and caller.via == "bearer" and 200 <= response.status_code < 300:
            response.set_cookie(
                COOKIE_NAME,
                _signer().sign(caller.key_id).decode(),
                max_age=app.config["SESSION_MAX_AGE_SECONDS"],
                path="/",
                httponly=True,
                samesite="Lax",
                secure=request.is_secure,
            )
        return response
