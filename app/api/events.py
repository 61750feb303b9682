"""A conversation's events: post an action, list what is stored."""
from __future__ import annotations

from flask import Blueprint, Response, request

from .. import ratelimit, validation
from ..auth import authenticate_with, current_caller, self_authenticating
from ..errors import BadRequest, NotFound
from ..store import CONVERSATION_ID, conv_meta_key, visible_owner
from . import get_store, json_body

bp = Blueprint("events", __name__, url_prefix="/api/conversations")

LIST_DEFAULT = 100
LIST_MAX = 1000


# OPTIONS is the GET rule's (authenticated before the view, as on every route), not this view's.
@bp.post("/<cid>/events", provide_automatic_options=False)
@self_authenticating
def post_event(cid: str) -> Response:
    """Append the caller's action as a `user` event; an Idempotency-Key retry adds nothing."""
    caller = ratelimit.authenticate_counted("post")  # the key and its rate limit in one round trip
    idem = validation.idempotency_key(request.headers.get("Idempotency-Key"))
    body, raw = json_body()
    fields = validation.action(body)
    event_id, _replayed = get_store().append_event(
        caller.user_id, cid, fields, source="user",
        idempotency=(idem, validation.body_digest(raw)) if idem else None, agent_kind=validation.agent_kind(fields),
    )
    return Response(b'{"status":"ok","success":true,"event_id":%d}' % event_id, mimetype="application/json")


@bp.get("/<cid>/events")
@self_authenticating
def list_events(cid: str) -> Response:
    """Stored events from `start_id` on, `limit` at a time."""
    try:
        start_id = validation.parse_int("start_id", request.args.get("start_id"), default=0, minimum=0)
        limit = validation.parse_int("limit", request.args.get("limit"), default=LIST_DEFAULT, minimum=1,
                                     maximum=LIST_MAX)
    except BadRequest:
        current_caller()  # a 401 comes before a 400, as on every route
        raise
    known = CONVERSATION_ID.fullmatch(cid) is not None  # another id never reaches Redis (a `}` breaks the hash tag)
    # The owner is read with the key, in one round trip, and the events only for the owner: another
    # user's id costs what a missing one does (bench/isolation_timing.py), and no script copies a
    # whole page inside Redis.
    caller, answers = authenticate_with(lambda pipe: pipe.hmget(conv_meta_key(cid), "owner", "pending") if known
                                        else None)
    if (visible_owner(*answers[0]) if known else None) != caller.user_id:
        raise NotFound("no such conversation")
    events, has_more = get_store().events_page(cid, start_id, limit)
    # The stored JSON goes out as it is: no decode and re-encode per event.
    body = b'{"events":[' + b",".join(events) + b'],"has_more":' + (b"true" if has_more else b"false") + b"}"
    return Response(body, mimetype="application/json")
