"""gunicorn settings: gevent workers, many connections each, streams ended cleanly on exit."""
import os
import re
import resource
import stat
import tempfile
from urllib.parse import unquote

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn's gevent worker, with a deadline on each request body (a slow client cannot hold a
# connection slot; the head is bounded by `keepalive` below): see app/gunicorn_worker.py.
worker_class = "app.gunicorn_worker.BoundedGeventWorker"
# One stream costs one file descriptor; a process may hold at most RLIMIT_NOFILE of them.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "19500"))
timeout = 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
# Also the bound on a request's head: gevent's worker parses every head (the first on a connection
# too) under a keep-alive timer of this many seconds, then closes the connection unanswered.
keepalive = 5
# gunicorn's own X-Forwarded-Proto handling (wsgi.url_scheme from a peer listed here) trusts
# loopback by default, so any local process could mark its request https; no peer is trusted
# unless FORWARDED_ALLOW_IPS names it. Behind a proxy use TRUSTED_PROXIES (the app's ProxyFix)
# instead: it also takes the client's address and host. Both may be on; they read the same header.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "")
# Never preload: the gevent worker must patch before the app (and ssl, redis) is imported.
preload_app = False
control_socket_disable = os.environ.get("GUNICORN_CONTROL_SOCKET", "") == ""
if not control_socket_disable:
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
accesslog = os.environ.get("ACCESS_LOG") or None
# gunicorn's default line has the request line with its query string (%(r)s) and the Referer, where
# a careless client may have put a key (API.md never asks for one in a URL): the path alone is
# logged, with the request id the app echoes. Authorization and Cookie are never in it.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s" %({x-request-id}o)s'
# Prometheus multiprocess mode: each worker keeps its metrics in files here, a scrape sums them.
# PROMETHEUS_MULTIPROC_DIR, if not set, is chosen in on_starting from the addresses gunicorn
# really binds (`-b` wins over BIND), before any worker imports prometheus_client (which reads
# it then: values.py's ValueClass). A binary upgrade's new master (SIGUSR2), serving the same
# sockets, shares it with the old one's workers; two servers on one host never do.
# A binary upgrade (USR2) forks a second master that re-executes gunicorn on the same listening
# sockets (GUNICORN_FD) and writes its pid to `<pidfile>.2`, renamed to `<pidfile>` once the old
# master has exited; without a pidfile nothing says which process the new master is (it is the old
# master's child, beside its workers), so the TERM that ends the old one and later signals to the
# new one have no safe target. The systemd unit sets no PIDFile=: no USR2 under systemd. Off unless PIDFILE is set.
pidfile = os.environ.get("PIDFILE") or None
loglevel = os.environ.get("LOG_LEVEL", "info")
# How long an exiting worker waits for gunicorn to close its listeners before it ends its streams.
LISTENER_CLOSE_WAIT = 1.5

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def _listening(worker) -> bool:
    """Whether the worker may still accept connections (one of its listening sockets is open)."""
    for sock in worker.sockets:
        try:
            if sock.fileno() != -1:
                return True
        except OSError:
            pass
    return False


def post_worker_init(worker):
    """End every open stream once the worker is told to exit (TERM, or HUP in the master) and stops accepting.

    gunicorn's gevent worker notices `alive` turning false only once a second (workers/ggevent.py
    `run`) and accepts new connections until then. A stream ended before that would reconnect
    (after `retry` ms) onto a connection this worker may still accept, and the hub, shut down,
    would answer it 503, which closes an EventSource for good. So the hub is shut down only once
    the listeners are closed (or after LISTENER_CLOSE_WAIT, should that never be seen), and
    streams opened until then are served and then ended like the others.
    """
    import time

    import gevent

    def watch():
        while worker.alive:
            gevent.sleep(0.2)
        deadline = time.monotonic() + LISTENER_CLOSE_WAIT
        while _listening(worker) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        hub = worker.wsgi.extensions.get("hub") if hasattr(worker.wsgi, "extensions") else None
        if hub is not None:
            worker.log.info("worker exiting: ending %d open streams", hub.stream_count)
            hub.shutdown()

    gevent.spawn(watch)
    tune_gc()


def tune_gc() -> None:
    """Collect cycles less often: a worker holds thousands of long-lived streams.

    Each open stream holds about 73 objects the collector tracks; with CPython's default
    thresholds a full collection runs each time the heap grows by a quarter: 16 of them (3.4 s of
    CPU, up to 550 ms each, every stream waiting) while 18,000 streams open. What is loaded by now
    lives as long as the worker (frozen: never traversed again), and young collections run 28x
    less often (profiled with bench/profile_open.py --native).
    """
    import gc

    gc.freeze()
    gc.set_threshold(20000, 10, 10)


STREAM_PATH_PREFIX = "/api/sse/"


def pre_request(worker, req):
    """Serve every event-stream request as the last one on its connection (`Connection: close`).

    A browser's EventSource reconnects `retry` ms after a stream ends, on the same connection when
    the response allowed keep-alive. When the stream ended because this worker is exiting (HUP in
    the master, TERM), that connection still belongs to this worker, which would answer the
    reconnect with a 503, and a non-200 answer closes an EventSource for good. With the request
    marked must-close, gunicorn says `Connection: close` in the response head and closes the socket
    after the stream's last chunk, so the reconnect opens a new connection and a live worker takes it.

    Why here: the app cannot do it itself, because gunicorn drops hop-by-hop headers an app sets
    (`Connection` among them, http/wsgi.py `Response.process_headers`), and its keep-alive loop
    (workers/base_async.py `handle`) serves the next request on the connection without checking
    whether the worker is still alive; `force_close()` at request time only happens for requests that
    *start* after the worker stopped being alive. `pre_request` is the documented hook that runs
    before the response exists, and `Request.force_close()` is the request's own switch that
    `Response.should_close()` reads: it only changes the `Connection` header and the close after the
    response. Framing is untouched: chunked transfer encoding still depends on the HTTP version and
    method alone (`Response.is_chunked`), so the hub's pre-framed chunks on HTTP/1.1 GETs stay valid
    and gunicorn still ends them with the last chunk. An HTTP/1.0 stream was closed at its end
    already; a HEAD of a stream now closes too (harmless). Every other request keeps keep-alive.
    """
    worker.log.debug("%s %s", req.method, req.path)  # what gunicorn's default pre_request does
    # Flask routes on the unquoted path (`/api/%73se/...` is a stream too), after any SCRIPT_NAME.
    if STREAM_PATH_PREFIX in unquote(req.path or ""):
        req.force_close()


def default_metrics_dir(addresses) -> str:
    """The metrics directory of a server bound to `addresses` (gunicorn's `cfg.address`), under the temp dir."""
    names = [f"{a[0]}:{a[1]}" if isinstance(a, tuple) else str(a) for a in addresses]
    return os.path.join(tempfile.gettempdir(), f"openhands-metrics-{os.getuid()}",
                        re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(names)) or "default")


def private_dir_problem(path: str) -> str | None:
    """Why `path` is not a directory only we may write (a symlink, another owner, group/other-writable), or None."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return f"cannot be examined ({err.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not {os.getuid()}"
    if info.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def make_private_dir(path: str, check_parent: bool) -> None:
    """Create `path` (and its parent) mode 0700 if missing; SystemExit unless they are ours alone.

    In the shared temp dir the name is predictable: a directory (or symlink) made there first by
    another user would otherwise receive, or redirect, our metrics files.
    """
    parent = os.path.dirname(path)
    for directory, checked in ((parent, check_parent), (path, True)):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(directory, 0o700, exist_ok=True)
        problem = private_dir_problem(directory) if checked else None
        if problem:
            raise SystemExit(f"gunicorn.conf.py: the metrics directory {directory} {problem}; refusing to start "
                             "(remove it, or set PROMETHEUS_MULTIPROC_DIR to a directory of this user's)")


def on_starting(server):
    """Choose and make the metrics directory, emptied of an earlier run's files (not on a binary upgrade: live)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        # Set here, in the master, before any worker forks (and before anything imports prometheus_client).
        path = default_metrics_dir(server.cfg.address)
        make_private_dir(path, check_parent=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    else:
        make_private_dir(path, check_parent=False)
    if "GUNICORN_PID" in os.environ:
        return  # the new master of a SIGUSR2 upgrade: the old master's workers still count here
    for name in os.listdir(path):
        if name.endswith(".db"):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass


def child_exit(server, worker):
    """A worker is gone: its live gauges (open streams) no longer count; its counters still do."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
