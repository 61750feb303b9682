"""API keys, the session cookie, the current user."""
from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flask import Flask, Response, current_app, g, request
from itsdangerous import BadSignature, TimestampSigner
from werkzeug.http import dump_cookie

from . import cors
from .config import secret_from_file
from .errors import Forbidden, Unauthorized
from .key_store import KEY_PREFIX, hash_secret
from .keys import COOKIE_GEN, api_key_key, cookie_generation
from .lua import SIGN_OUT_LUA

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
    cookie_gen: int = 0  # the key's cookie generation when it was read: a cookie minted now carries it


class CookieKeyId(str):
    """A key id proven by a session cookie, carrying the cookie's generation (the key's sign-out count then).

    It is the caller's `key_id` and so the stream's (`Subscriber.key_id`): the hub's check ends a
    cookie stream once its key's generation is another (a sign-out), and leaves the key's Bearer
    streams, whose key id is a plain str, alone.
    """

    cookie_gen: int

    def __new__(cls, key_id: str, gen: int) -> CookieKeyId:
        """The key id `key_id`, of a cookie of generation `gen`."""
        self = super().__new__(cls, key_id)
        self.cookie_gen = gen
        return self


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
    cookie_gen: int = 0  # a cookie's generation (valid while it is the key's)


def presented() -> Presented | None:
    """The key id a request's Bearer key or else session cookie names; None when neither names one (a 401)."""
    header = request.headers.get("Authorization")
    if header is not None:  # a Bearer key, when sent, is the only credential looked at
        scheme, _, key = header.partition(" ")
        key = key.strip()
        key_id = split_key(key) if scheme.lower() == "bearer" else None
        return Presented(key_id, "bearer", key) if key_id else None
    found = cookie_key_id(request.cookies.getlist(COOKIE_NAME))
    return Presented(found[0], "cookie", "", found[1]) if found else None


# A cookie's signed payload: `<key id>:g<generation>`, or (first release) `<key id>` alone, which is
# generation 0: valid until the key's first sign-out. The `<key id>:<unix ms>` of an unreleased build
# (sign-out by mint time) matches neither and is refused: its number is no generation.
_COOKIE_PAYLOAD = re.compile(rf"([0-9a-f]{{{KEY_ID_LEN}}})(?::g([0-9]{{1,15}}))?")


def cookie_payload(key_id: str, gen: int) -> str:
    """What the session cookie of key `key_id` signs, at the key's cookie generation `gen`."""
    return f"{key_id}:g{gen}"


def cookie_key_id(values: list[str]) -> tuple[str, int] | None:
    """The key id and generation of the newest validly signed session cookie sent; None if none is.

    A browser sends every cookie of that name that matches the path, longest path first, so a
    page of another origin of the same site (a sibling subdomain, another port) can plant one
    beside ours: a garbage one is skipped rather than locking the user out, and of two good ones
    the newest signed wins (a fresh sign-in beats a planted cookie).
    """
    best: tuple[float, int, str] | None = None
    max_age = current_app.config["SESSION_MAX_AGE_SECONDS"]
    for value in values[:8]:  # a request carrying more is not a browser's doing; 8 bounds the work
        try:
            payload, signed_at = _signer().unsign(value, max_age=max_age, return_timestamp=True)
        except BadSignature:
            continue
        shape = _COOKIE_PAYLOAD.fullmatch(payload.decode(errors="replace"))
        if shape is None:
            continue
        # Newest signed first; of one second's, the later generation (a sign-in after a sign-out).
        found = (signed_at.timestamp(), int(shape.group(2) or 0), shape.group(1))
        if best is None or found[:2] > best[:2]:
            best = found
    return (best[2], best[1]) if best else None


def cookie_gen(record: dict[str, str]) -> int:
    """The key's cookie generation: how many times it signed out (absent: 0); only its cookies of it are valid."""
    return cookie_generation(record.get(COOKIE_GEN))


def verify(creds: Presented | None, record: dict[str, str] | None) -> Caller:
    """The caller these credentials prove, given the record of their key; 401 otherwise."""
    if creds is None or not record or not record.get("user_id") or record.get("revoked_at"):
        raise Unauthorized("missing or invalid credentials")
    # Compared in constant time even though the record was found by the key id.
    if creds.via == "bearer" and not hmac.compare_digest(record.get("hash", ""), hash_secret(creds.key)):
        raise Unauthorized("missing or invalid credentials")
    gen = cookie_gen(record)
    if creds.via == "cookie":
        if creds.cookie_gen != gen:  # of a generation the key has signed out of (DELETE /api/session)
            raise Unauthorized("missing or invalid credentials")
        if request.method not in SAFE_METHODS:
            refuse_cross_origin()
        return Caller(record["user_id"], CookieKeyId(creds.key_id, gen), creds.via, gen)
    return Caller(record["user_id"], creds.key_id, creds.via, gen)


def revoke_cookies(key_id: str) -> bool:
    """Revoke every session cookie the key minted so far, on every browser (a new generation); False: no such key.

    No clock is read: a cookie is valid only while its generation is the key's, whichever host
    minted it or signs out. Not idempotent, and need not be: the pool never re-sends a command
    whose reply was lost, and a second increment only revokes more (the cookies of the generation
    between), never less, so a retry by hand (the CLI's advice) is safe.
    """
    return bool(current_app.extensions["revoke_cookies"](keys=[api_key_key(key_id)], args=[COOKIE_GEN]))


def refuse_cross_origin() -> None:
    """403 for a cookie-authenticated write that a page of another origin sent (CSRF).

    SameSite=Lax keeps the cookie from other sites, not from other origins of the same site (a
    sibling subdomain, another port of the host, the host over plain http). Browsers say where a
    request comes from in `Sec-Fetch-Site`, whatever the Host header a proxy passes on; older ones
    only in `Origin`, compared with the Host header as a fallback.
    """
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() in current_app.config["CORS_ORIGINS"]:
        return  # an origin the operator allows (CORS_ORIGINS), as CORS lets it read the answers too
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site in ("same-origin", "none"):  # "none": the user's own doing (typed, a bookmark)
            return
        raise Forbidden(CROSS_ORIGIN)
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
    app.extensions["revoke_cookies"] = app.extensions["store"].redis.register_script(SIGN_OUT_LUA)

    @app.before_request
    def _require_caller() -> None:
        # Flask answers OPTIONS itself without running the view: a view that checks its caller
        # itself has not done so then, so OPTIONS needs a caller here like every /api route.
        checks_itself = getattr(app.view_functions.get(request.endpoint), "self_authenticating", False) \
            and request.method != "OPTIONS"
        if request.path.startswith("/api/") and request.endpoint is not None and not checks_itself \
                and not cors.allowed_preflight():  # a browser never sends credentials with a preflight
            current_caller()

    # The Set-Cookie line depends only on the key, its cookie generation (as this request read it),
    # the scheme and the current second (the signature's timestamp, the Expires date): made once per
    # second for each, not per answer. A sign-out changes the generation, so its line is made anew.
    cookies: dict[tuple[str, int, bool], str] = {}
    cookies_second = [0]

    def cookie_line(key_id: str, gen: int, secure: bool) -> str:
        now = int(time.time())
        if now != cookies_second[0]:
            cookies.clear()  # only this second's lines are kept: at most a few per key in use
            cookies_second[0] = now
        line = cookies.get((key_id, gen, secure))
        if line is None:
            line = cookies[(key_id, gen, secure)] = dump_cookie(
                COOKIE_NAME,
                _signer().sign(cookie_payload(key_id, gen)).decode(),
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
            response.headers.add("Set-Cookie", cookie_line(caller.key_id, caller.cookie_gen, request.is_secure))
        return response
