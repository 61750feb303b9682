"""Per-API-key rate limits on posts and stream opens (POST_RATE_LIMIT, STREAM_RATE_LIMIT), shared by every host.

Each limit is a token bucket that holds a minute's allowance and refills at that rate: a key idle
for a minute may make that many requests at once, then that many a minute (so at most twice the
limit in any 60 s). It is kept as GCRA in Redis (lua.RATE_LIMIT_LUA): one key per API key and kind,
``ratelimit:{<key id>}:<kind>`` (the hash tag of the key's record, ``apikey:{<key id>}``: one
Cluster slot), one script run per request on the pipeline that looks the key up (no round trip of
its own), with Redis' clock, so workers and hosts share it exactly. A refused request writes
nothing and is answered ``429 rate_limited`` with ``Retry-After`` (whole seconds, at least 1,
after which the next request passes), before anything is stored.

The script is never re-sent: a second run after a lost reply would count the request twice. Any
Redis error is the request's 503 (errors.py), as for the lookup of the key that comes with it, but
one: a stream open that Redis cannot count because it refuses writes (out of memory, a read-only
replica) goes on uncounted, as it did before it was limited (it only reads; a 503 would close a
browser's EventSource for good). A post would fail on its own write anyway: its 503 stays.
The script goes as EVAL, not EVALSHA: its text is small, and a restarted or failed-over Redis,
which has no scripts loaded, never makes a pipeline fail on NOSCRIPT.
"""
from __future__ import annotations

import math
from typing import Any

from flask import current_app, request

from . import metrics
from .auth import SAFE_METHODS, Caller, authenticate_with, presented, refuse_cross_origin
from .errors import Forbidden, TooManyRequests
from .key_store import hash_secret
from .keys import api_key_key
from .lua import RATE_LIMIT_LUA

# kind -> (its setting, what it limits, for the 429's message)
KINDS = {
    "post": ("POST_RATE_LIMIT", "posts (new conversations and events)"),
    "stream": ("STREAM_RATE_LIMIT", "stream opens"),
}
US = 1_000_000  # microseconds in a second, the script's unit
# kind -> whether it goes on uncounted when Redis refuses the script's write (OOM, READONLY): the script's ARGV[5].
UNCOUNTED_WHEN_UNWRITABLE = {"post": "", "stream": "1"}
# Made at zero at import (in each worker: the app is never preloaded), so rate() sees the first refusal.
_REFUSED = {kind: metrics.RATE_LIMITED.labels(kind) for kind in KINDS}


def rate_limit_key(key_id: str, kind: str) -> str:
    """The GCRA state of one API key's limit of one kind: when its bucket is full again (unix us); expires then."""
    return f"ratelimit:{{{key_id}}}:{kind}"


def interval_us(per_minute: int) -> int:
    """Microseconds between two requests at the sustained rate (rounded up: never faster than the setting)."""
    return -(-60 * US // per_minute)


def tolerance_us(per_minute: int) -> int:
    """How far ahead of now the bucket's TAT may run: a burst of `per_minute` requests (the first one costs none)."""
    return interval_us(per_minute) * (per_minute - 1)


def retry_after(wait_us: int) -> int:
    """The Retry-After of a refusal: whole seconds, rounded up (so the request after it passes), at least 1."""
    return max(1, math.ceil(wait_us / US))


def _per_minute(kind: str) -> int:
    return current_app.config[KINDS[kind][0]]


def _judge(kind: str, wait_us: Any) -> None:
    """The 429 when the script's answer says the request is over the limit."""
    if int(wait_us) <= 0:
        return
    _REFUSED[kind].inc()
    per_minute, seconds = _per_minute(kind), retry_after(int(wait_us))
    raise TooManyRequests(
        f"too many {KINDS[kind][1]} with this API key: at most {per_minute} a minute (in bursts of up to "
        f"{per_minute}); retry in {seconds} s", code="rate_limited", headers={"Retry-After": str(seconds)})


class PipelinedCheck:
    """A limit check queued on the pipeline that looks the caller's key up (auth.authenticate_with): no round trip more.

    It runs before the credentials are verified, so the script checks them itself (a live record,
    the Bearer key's hash, the cookie's generation), and a cookie's write from another origin
    (auth's 403) is not queued: a request that will be refused spends no one's budget, so a
    signed-out (stolen) cookie cannot spend its key's.
    """

    def __init__(self, kind: str, wanted: bool = True):
        self.kind = kind
        self.wanted = wanted and bool(_per_minute(kind))
        self.queued = False

    def queue(self, pipe: Any) -> None:
        """Queue the script; queue it last, its reply is taken off the end of the replies."""
        creds = presented() if self.wanted else None
        if creds is None:
            return
        if creds.via == "cookie" and request.method not in SAFE_METHODS:
            try:
                refuse_cross_origin()
            except Forbidden:
                return  # auth.verify answers it 403
        per_minute = _per_minute(self.kind)
        digest = hash_secret(creds.key) if creds.via == "bearer" else ""
        gen = str(creds.cookie_gen) if creds.via == "cookie" else ""
        pipe.eval(RATE_LIMIT_LUA, 2, rate_limit_key(creds.key_id, self.kind), api_key_key(creds.key_id),
                  interval_us(per_minute), tolerance_us(per_minute), digest, gen, UNCOUNTED_WHEN_UNWRITABLE[self.kind])
        self.queued = True

    def judge(self, replies: list[Any]) -> None:
        """Take the script's reply off the end of `replies`; 429 when the request is over the limit."""
        if self.queued:
            _judge(self.kind, replies.pop())


def authenticate_counted(kind: str) -> Caller:
    """The caller (as auth.current_caller) with one request of `kind` counted, in the key lookup's round trip; 429 over.

    For a view marked auth.self_authenticating, before it stores anything: a 429 stores nothing.
    """
    limit = PipelinedCheck(kind)
    caller, replies = authenticate_with(limit.queue)
    limit.judge(replies)
    return caller
