"""The application factory."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings from the environment, overridden by `config` (tests)."""
    # Imported here, not at the package's import: `python -m app.agent` patches the standard
    # library with gevent first, which must come before anything imports ssl (redis-py does).
    from flask import Flask

    from . import auth, cors, errors, logs, metrics
    from . import redis as redis_ext
    from .config import load_settings
    from .store import Store

    app = Flask(__name__)
    settings = load_settings()
    settings.update(config or {})
    app.config.update(settings)
    if app.config["TRUSTED_PROXIES"]:
        # Each trusted proxy appends one X-Forwarded-For entry and overwrites -Proto and -Host, so
        # the n-th value from the right is the one our own outermost proxy saw; a direct client's
        # headers are believed only with a count above 0 (then gunicorn must be reachable by the proxies alone).
        from werkzeug.middleware.proxy_fix import ProxyFix

        count = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=count)  # type: ignore[method-assign]
    # Every JSON body the API takes is capped; Werkzeug answers 413 past it, even when chunked.
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_EVENT_BYTES"]
    logs.configure(app.config["LOG_FORMAT"])

    redis_ext.init_app(app)
    app.extensions["store"] = Store(
        redis_ext.get_redis(app),
        retention=app.config["EVENT_RETENTION"],
        idempotency_ttl=app.config["IDEMPOTENCY_TTL_SECONDS"],
        min_replicas=app.config["REDIS_MIN_REPLICAS_ACK"],
        replicas_timeout_ms=app.config["REDIS_REPLICAS_ACK_TIMEOUT_MS"],
        agent_shards=app.config["AGENT_SHARDS"],
    )
    errors.init_app(app)
    logs.init_app(app)  # before auth: a request refused there has its id and its log line too
    auth.init_app(app)
    cors.init_app(app)
    metrics.init_app(app)

    from .api import conversations, docs, events, health, sse
    for module in (conversations, events, sse, health, docs):
        app.register_blueprint(module.bp)
    from . import web
    web.init_app(app)

    from .agent.cli import agent
    from .cli import keys
    app.cli.add_command(keys)
    app.cli.add_command(agent)
    return app
