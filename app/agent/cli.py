"""Flask commands: `agent run` (one agent worker) and `agent sample` (a repository to try the readme agent on)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import with_appcontext


@click.group()
def agent() -> None:
    """Agent workers."""


@agent.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--agent", "agent_name", help="echo, readme, llm, auto or module:Class (default: AGENT)")
@click.option("--concurrency", type=click.IntRange(min=1), help="conversations answered at once (default: "
              "AGENT_CONCURRENCY)")
def run(agent_name: str | None, concurrency: int | None) -> None:
    """Run one agent worker until TERM or Ctrl-C (start any number, on any hosts)."""
    # The worker must be patched by gevent before ssl and threading are imported, which this
    # command's process did already (it loaded the app): it becomes a fresh one that patches first.
    argv = [sys.executable, "-m", "app.agent", "run"]
    if agent_name:
        argv += ["--agent", agent_name]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    root = Path(__file__).resolve().parent.parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, argv)


@agent.command("sample")
@with_appcontext
def sample() -> None:
    """Make the sample repository `sample/hello` in AGENT_WORKSPACE; print its name."""
    from .readme import make_sample_repository
    workspace = Path(current_app.config["AGENT_WORKSPACE"])
    name = make_sample_repository(workspace)
    click.echo(f"Made {workspace / name}: create a conversation with \"repository\": \"{name}\" to have it checked.")
    click.echo(name)
