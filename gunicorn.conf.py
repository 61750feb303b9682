"""gunicorn settings: gevent workers, many connections each, streams ended cleanly on exit."""
import os
import resource

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
# One stream costs one file descriptor; a process may hold at most RLIMIT_NOFILE of them.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "19500"))
timeout = 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
keepalive = 5
# Never preload: the gevent worker must patch before the app (and ssl, redis) is imported.
preload_app = False
control_socket_disable = os.environ.get("GUNICORN_CONTROL_SOCKET", "") == ""
if not control_socket_disable:
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
accesslog = os.environ.get("ACCESS_LOG") or None
loglevel = os.environ.get("LOG_LEVEL", "info")

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def post_worker_init(worker):
    """End every open stream as soon as the worker is told to exit (TERM, or HUP in the master)."""
    import gevent

    def watch():
        while worker.alive:
            gevent.sleep(0.2)
        hub = worker.wsgi.extensions.get("hub") if hasattr(worker.wsgi, "extensions") else None
        if hub is not None:
            worker.log.info("worker exiting: ending %d open streams", hub.stream_count)
            hub.shutdown()

    gevent.spawn(watch)
