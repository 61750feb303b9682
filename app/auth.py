"""API keys, the session cookie, the current user."""
from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flask import Flask, Response, current_app, g, request
from itsdangerous import BadSignature, TimestampSigner
from werkzeug.http import dump_cookie

from .config import secret_from_file
from .errors import Forbidden, Unauthorized
from .store import KEY_PREFIX, api_key_key, hash_secret

COOKIE_NAME = "oh_session"
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
KEY_ID_LEN = 16
F = TypeVar("F", bound=Callable[..., Any])


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


@dataclass(frozen=True)
class Presented:
    """The credentials a request presents, before the key behind them is looked up."""

    key_id: str
    via: str  # "bearer" or "cookie"
    key: str  # the Bearer key itself (its hash is compared), "" for a cookie


def presented() -> Presented | None:
    """The key id a request's Bearer key or else session cookie names; None when neither names one (a 401)."""
    header = request.headers.get("Authorization")
    if header is not None:  # a Bearer key, when sent, is the only credential looked at
        scheme, _, key = header.partition(" ")
        key = key.strip()
        key_id = split_key(key) if scheme.lower() == "bearer" else None
        return Presented(key_id, "bearer", key) if key_id else None
    key_id = cookie_key_id(request.cookies.getlist(COOKIE_NAME))
    return Presented(key_id, "cookie", "") if key_id else None


def cookie_key_id(values: list[str]) -> str | None:
    """The key id of the newest validly signed session cookie among those sent; None if none is.

    A browser sends every cookie of that name that matches the path, longest path first, so a
    page of another origin of the same site (a sibling subdomain, another port) can plant one
    beside ours: a garbage one is skipped rather than locking the user out, and of two good ones
    the newest signed wins (a fresh sign-in beats a planted cookie).
    """
    best: tuple[int, str] | None = None
    max_age = current_app.config["SESSION_MAX_AGE_SECONDS"]
    for value in values[:8]:  # a request carrying more is not a browser's doing; 8 bounds the work
        try:
            key_id, signed_at = _signer().unsign(value, max_age=max_age, return_timestamp=True)
        except BadSignature:
            continue
        stamp = int(signed_at.timestamp())
        if key_id and (best is None or stamp > best[0]):
            best = (stamp, key_id.decode())
    return best[1] if best else None


def verify(creds: Presented | None, record: dict[str, str] | None) -> Caller:
    """The caller these credentials prove, given the record of their key; 401 otherwise."""
    if creds is None or not record or record.get("revoked_at"):
        raise Unauthorized("missing or invalid credentials")
    # Compared in constant time even though the record was found by the key id.
    if creds.via == "bearer" and not hmac.compare_digest(record["hash"], hash_secret(creds.key)):
        raise Unauthorized("missing or invalid credentials")
    if creds.via == "cookie" and request.method not in SAFE_METHODS:
        refuse_cross_origin()
    return Caller(record["user_id"], creds.key_id, creds.via)


def refuse_cross_origin() -> None:
    """403 for a cookie-authenticated write that a page of another origin sent (CSRF).

    SameSite=Lax keeps the cookie from other sites, not from other origins of the same site (a
    sibling subdomain, another port of the host, the host over plain http). Browsers say where a
    request comes from in `Sec-Fetch-Site`, whatever the Host header a proxy passes on; older ones
    only in `Origin`, compared with the Host header as a fallback.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site in ("same-origin", "none"):  # "none": the user's own doing (typed, a bookmark)
            return
        raise Forbidden(CROSS_ORIGIN)
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not sent by a browser page of another origin (curl, an old browser's same-origin form)
    if origin == "null" or normal_host(origin.partition("://")[2]) != normal_host(request.headers.get("Host", "")):
        raise Forbidden(CROSS_ORIGIN)


CROSS_ORIGIN = "a session cookie cannot be used from another origin; send the API key as a Bearer token"


def normal_host(host: str) -> str:
    """A host[:port] compared case-blind, without a default port (browsers omit it in Origin)."""
    host = host.strip().lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[:-len(default)]
    return host


def authenticate() -> Caller:
    """The caller of this request, from a Bearer key or else the session cookie; 401 otherwise."""
    creds = presented()
    record = current_app.extensions["store"].get_api_key(creds.key_id) if creds else None
    return verify(creds, record)


def authenticate_with(reads: Callable[[Any], None]) -> tuple[Caller, list[Any]]:
    """The caller (as `current_caller`), and the replies to the reads `reads` queues on a pipeline.

    The key's record and those reads go to Redis in one round trip (a stream's open reads its
    conversation's owner so, one round trip instead of two). Bad credentials are a 401
    before anything is read, as with `authenticate`; the reads' replies are for the caller to
    check only once it is known.
    """
    creds = presented()
    if creds is None:
        raise Unauthorized("missing or invalid credentials")
    pipe = current_app.extensions["store"].redis.pipeline(transaction=False)
    pipe.hgetall(api_key_key(creds.key_id))
    reads(pipe)
    raw, *replies = pipe.execute()
    g.caller = verify(creds, {k.decode(): v.decode() for k, v in raw.items()})
    return g.caller, replies


def current_caller() -> Caller:
    """The authenticated caller of this request (authenticating it on first use)."""
    caller = g.get("caller")
    if caller is None:
        caller = g.caller = authenticate()
    return caller


def self_authenticating(view: F) -> F:
    """Mark a view that authenticates its caller itself (`authenticate_with`) or needs none: not before it runs."""
    view.self_authenticating = True  # type: ignore[attr-defined]
    return view


def init_app(app: Flask) -> None:
    """Authenticate every /api request; mint the session cookie on 2xx answers to Bearer callers."""
    # Made once, at start: minting a cookie then needs no I/O, so it cannot fail after a request
    # has stored something (and the signer derives its key from the secret only once).
    secret = app.config["SECRET_KEY"] or secret_from_file(Path(app.config["SECRET_KEY_FILE"]))
    app.extensions["session_signer"] = TimestampSigner(secret, salt="oh-session")

    @app.before_request
    def _require_caller() -> None:
        if request.path.startswith("/api/") and request.endpoint is not None \
                and not getattr(app.view_functions.get(request.endpoint), "self_authenticating", False):
            current_caller()

    # The Set-Cookie line depends only on the key, the scheme and the current second (the
    # signature's timestamp, the Expires date): made once per second for each, not per answer.
    cookies: dict[tuple[str, bool], str] = {}
    cookies_second = [0]

    def cookie_line(key_id: str, secure: bool) -> str:
        now = int(time.time())
        if now != cookies_second[0]:
            cookies.clear()  # only this second's lines are kept: at most one per key in use
            cookies_second[0] = now
        line = cookies.get((key_id, secure))
        if line is None:
            line = cookies[(key_id, secure)] = dump_cookie(
                COOKIE_NAME,
                _signer().sign(key_id).decode(),
                max_age=app.config["SESSION_MAX_AGE_SECONDS"],
                path="/",
                httponly=True,
                samesite="Lax",
                secure=secure,
                max_size=app.config["MAX_COOKIE_SIZE"],
            )
        return line

    @app.after_request
    def _session_cookie(response: Response) -> Response:
        caller = g.get("caller")
        if caller is not None and caller.via == "bearer" and 200 <= response.status_code < 300:
            response.headers.add("Set-Cookie", cookie_line(caller.key_id, request.is_secure))
        return response
