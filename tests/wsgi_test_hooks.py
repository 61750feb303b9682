"""The app with hooks a test can pull by header: a stream response that is never sent, a worker on its way out."""
from flask import Response, request

from app import create_app
from app.api.sse import get_hub

app = create_app()


@app.before_request
def close_hub_on_demand() -> None:
    """Put this worker's hub in the state of a worker that was told to exit."""
    if request.headers.get("X-Test-Close-Hub"):
        get_hub().shutdown()


@app.after_request
def fail_on_demand(response: Response) -> Response:
    """Raise when the test asks, after the view has registered its stream."""
    if request.headers.get("X-Test-Fail-After-Request"):
        raise RuntimeError("failing after the view, as the test asked")
    return response
