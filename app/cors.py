"""CORS for the origins the operator names (CORS_ORIGINS), with credentials, through flask-cors."""
from __future__ import annotations

import re

from flask import Flask, Response, current_app, request

# What a client of another origin sends and must be able to read (the safelisted ones aside).
ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Request-ID"]
EXPOSE_HEADERS = ["Retry-After", "X-Request-ID", "Allow"]
METHODS = ["GET", "HEAD", "POST", "DELETE", "OPTIONS"]
PREFLIGHT_MAX_AGE = 600  # seconds a browser may keep a preflight's answer (Chromium caps it at 7200)


def allowed_preflight() -> bool:
    """Whether this request is a CORS preflight from a configured origin (answered without credentials)."""
    return (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
            and request.headers.get("Origin", "").lower() in current_app.config["CORS_ORIGINS"])


def init_app(app: Flask) -> None:
    """CORS headers on /api answers to the configured origins; none at all when CORS_ORIGINS is empty."""
    origins: tuple[str, ...] = app.config["CORS_ORIGINS"]
    if not origins:
        return
    from flask_cors import CORS

    CORS(
        app,
        resources={r"/api/*": {}},
        # Compiled, anchored and escaped: flask-cors takes a string holding regex characters (an IPv6
        # origin's brackets) as a regex that may match a prefix only; each of ours is exact.
        origins=[re.compile(re.escape(origin) + r"\Z", re.IGNORECASE) for origin in origins],
        supports_credentials=True,  # the answer names the one origin, never '*'
        always_send=False,  # nothing for requests without an Origin (flask-cors would list every origin)
        methods=METHODS,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        max_age=PREFLIGHT_MAX_AGE,
        vary_header=False,  # Vary: Origin is on every /api answer, below
        allow_private_network=False,
    )

    @app.after_request
    def _vary_origin(response: Response) -> Response:
        # Every /api answer depends on the Origin (CORS headers or none): a cache must key on it.
        if request.path.startswith("/api/"):
            response.vary.add("Origin")
        return response
