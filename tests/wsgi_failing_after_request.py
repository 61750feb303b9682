"""The app with an after-request hook that fails on demand: a stream response that is never sent."""
from flask import Response, request

from app import create_app

app = create_app()


@app.after_request
def fail_on_demand(response: Response) -> Response:
    """Raise when the test asks, after the view has registered its stream."""
    if request.headers.get("X-Test-Fail-After-Request"):
        raise RuntimeError("failing after the view, as the test asked")
    return response
