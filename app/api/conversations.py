"""Conversations: create, list, read, delete."""
from __future__ import annotations

from flask import Blueprint, Response, request

from .. import ratelimit, validation
from ..auth import current_caller, self_authenticating
from ..errors import BadRequest, json_response
from . import get_store, json_body

bp = Blueprint("conversations", __name__, url_prefix="/api/conversations")

PAGE_DEFAULT = 20
PAGE_MAX = 100


# OPTIONS is the GET rule's (authenticated before the view, as on every route), not this view's.
@bp.post("", provide_automatic_options=False)
@self_authenticating
def create_conversation() -> Response:
    """Create a conversation; its initial message becomes event 0."""
    caller = ratelimit.authenticate_counted("post")  # the key and its rate limit in one round trip
    body, _raw = json_body(required=False)
    message, repository, branch = validation.conversation_fields(body)
    store = get_store()
    cid = store.new_conversation_id()
    store.create_conversation(
        caller.user_id, cid, repository=repository, branch=branch,
        title=validation.conversation_title(message, cid), initial_user_msg=message or None,
    )
    return json_response({"status": "ok", "conversation_id": cid})


@bp.get("")
def list_conversations() -> Response:
    """The caller's conversations, newest first, a page at a time."""
    caller = current_caller()
    limit = validation.parse_int("limit", request.args.get("limit"), default=PAGE_DEFAULT, minimum=1, maximum=PAGE_MAX)
    page_id = request.args.get("page_id")
    before = None
    if page_id:
        # isdigit() alone lets through digits int() refuses (e.g. "²"), which would be a 500.
        if not (page_id.isascii() and page_id.isdigit()) or len(page_id) > 18:
            raise BadRequest("page_id is not one this server gave out")
        before = int(page_id)
    results, next_page = get_store().list_conversations(caller.user_id, limit, before)
    return json_response({"results": results, "next_page_id": str(next_page) if next_page is not None else None})


@bp.get("/<cid>")
def get_conversation(cid: str) -> Response:
    """One conversation of the caller."""
    return json_response(get_store().get_conversation(current_caller().user_id, cid))


@bp.delete("/<cid>")
def delete_conversation(cid: str) -> Response:
    """Delete a conversation and its events; its open streams end."""
    get_store().delete_conversation(current_caller().user_id, cid)
    return json_response({"status": "ok"})
