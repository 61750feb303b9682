"""The agent worker process: settings, the agent, signals, the worker's loops."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

import gevent
import gevent.monkey

from .. import create_app
from ..config import ConfigError, load_settings
from ..redis import close
from .registry import AgentNotFound, load_agent
from .worker import Worker

log = logging.getLogger(__name__)


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line: `run`, with the agent and the concurrency (defaults: AGENT, AGENT_CONCURRENCY)."""
    parser = argparse.ArgumentParser(prog="python -m app.agent", description="Run one agent worker.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer users' messages until TERM or Ctrl-C")
    run.add_argument("--agent", help="echo, readme, llm, auto or module:Class (default: the AGENT setting)")
    run.add_argument("--concurrency", type=int, help="conversations answered at once (default: AGENT_CONCURRENCY)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run one worker until TERM/INT (a second one hands the runs going over at once)."""
    if not gevent.monkey.is_module_patched("socket"):
        print("the agent worker needs gevent's patching: start it with `python -m app.agent run`", file=sys.stderr)
        return 2
    args = parse(argv)
    if args.concurrency is not None and args.concurrency < 1:
        print("--concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        concurrency = args.concurrency or settings["AGENT_CONCURRENCY"]
        # Every run going may wait on Redis at once: the pool is sized for them, not for requests.
        app = create_app({"REDIS_POOL_SIZE": max(settings["REDIS_POOL_SIZE"], concurrency + 8)})
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    config = app.config
    store = app.extensions["store"]
    try:
        agent = load_agent(args.agent or config["AGENT"], config)
    except AgentNotFound as err:
        print(f"agent: {err}", file=sys.stderr)
        return 2
    worker = Worker(config, store, agent, concurrency)
    if config["AGENT_METRICS_PORT"]:
        from ..metrics import serve_agent_metrics

        try:
            serve_agent_metrics(config["AGENT_METRICS_PORT"])
        except OSError as err:
            print(f"agent metrics: cannot listen on 127.0.0.1:{config['AGENT_METRICS_PORT']} ({err.strerror})",
                  file=sys.stderr)
            close(app.extensions["redis"])
            return 2
    gevent.signal_handler(signal.SIGTERM, worker.stop)
    gevent.signal_handler(signal.SIGINT, lambda: worker.stop(cold=True))
    try:
        worker.serve()
    finally:
        close(app.extensions["redis"])
    return 0
