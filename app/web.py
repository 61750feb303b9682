"""The web app's page, signing in and out with the session cookie, and the security headers."""
from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, render_template, request

from .auth import COOKIE_NAME, current_caller, presented, revoke_cookies, self_authenticating, verify
from .errors import BadRequest, Unauthorized, json_response

bp = Blueprint("web", __name__)

# The page loads only its own scripts, styles and API; nothing inline, nothing from elsewhere,
# never framed. API answers carry it too: a JSON body opened in a tab is then inert as well.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@bp.get("/")
def index() -> Response:
    """The web app: one page; its script signs in, lists conversations and streams one."""
    response = Response(render_template("index.html"), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/api/session")
def who_am_i() -> Response:
    """Who the cookie (or Bearer key) proves: the page asks on load whether it is still signed in."""
    return json_response({"status": "ok", "user_id": current_caller().user_id})


@bp.post("/api/session")
def sign_in() -> Response:
    """Sign in: a Bearer key in, the session cookie out (set for every 2xx Bearer answer, see auth)."""
    caller = current_caller()
    if caller.via != "bearer":
        # A cookie alone would get a 200 and no new cookie: signing in takes the key itself.
        raise BadRequest("sign in with the API key as `Authorization: Bearer <key>`")
    return json_response({"status": "ok", "user_id": caller.user_id})


@bp.delete("/api/session")
@self_authenticating  # signing out needs no valid credentials: a stale cookie must be clearable
def sign_out() -> Response:
    """Sign out: every session cookie the key minted so far is revoked, on every browser, and this one cleared.

    The key itself stays valid until revoked: a later Bearer request mints a fresh cookie. Not
    `current_caller`: a Bearer sign-out must not be handed a new cookie by its own 2xx answer.
    """
    creds = presented()
    if creds is not None:
        try:
            verify(creds, current_app.extensions["store"].get_api_key(creds.key_id))  # 403 from another origin
        except Unauthorized:
            pass  # nothing valid to revoke (already signed out, revoked, forged): only the clearing below
        else:
            revoke_cookies(creds.key_id)
    response = json_response({"status": "ok"})
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="Lax", secure=request.is_secure)
    return response


def init_app(app: Flask) -> None:
    """Register the page and session routes; every response gets the security headers."""
    app.register_blueprint(bp)

    @app.after_request
    def _security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response
