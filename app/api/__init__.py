"""The HTTP API's blueprints, and the request helpers they share."""
from __future__ import annotations

from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import validation
from ..errors import UnsupportedMediaType
from ..store import Store


def get_store() -> Store:
    """The worker's store."""
    return current_app.extensions["store"]


def json_body(*, required: bool = True) -> tuple[dict[str, Any], bytes]:
    """The request's JSON object and its raw bytes (415 if not JSON; size capped by MAX_EVENT_BYTES)."""
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A body without Content-Length (chunked) is cut at the limit silently; one more byte left in
    # the server's stream means it was larger than the limit.
    if request.content_length is None and limit is not None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    if not raw.strip() and not required:
        return {}, raw
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be JSON (Content-Type: application/json)")
    return validation.decode_json_object(raw), raw
