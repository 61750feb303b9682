"""The interface an agent implements: one class, one method that yields the events of a run.

An agent is a class with a `run` method. The runtime calls it once per user message, with the
conversation, its history (every stored event up to and including that message, oldest first)
and the message itself, and writes each event it yields into the conversation, in order, with
`cause` (the message's id), `id`, `timestamp` and `source` added. What it may yield:

    {"type": "agent_message", "content": "the reply"}
    {"type": "agent_action", "action": "read", "args": {"path": "README.md"}}
    {"type": "observation", "observation": "read", "content": "..."}   # source: environment;
        # action_id is the id of the agent_action yielded just before, unless the agent sets it
    {"type": "agent_message_delta", "text": "a bit of the reply"}      # live only, never stored:
        # the next agent_message ends (and replaces) the reply these bits make up
    {"type": "error", "message": "a safe text"}                        # or raise AgentError

Other fields of a yielded event are kept as they are (JSON values). The runtime writes
`agent_state_changed` itself (`running` before the first event, `awaiting_user_input` after the
last, `stopped` or `error`). A run is cancelled (stop button, per-step timeout, shutdown) by
raising gevent's GreenletExit (or Timeout) at the agent's next blocking call: release what you
hold in `finally`, and do not swallow BaseException. Runs of one conversation never overlap;
runs of different conversations share the worker's event loop (gevent), so block only on I/O.
A run that was cut off (its worker killed) is run again from the start by another worker: the
events the first attempt wrote are skipped by position, so an agent should yield the same steps
for the same input where it can.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


class AgentError(Exception):
    """Raised by an agent to end its run with this message as the `error` event (shown to the user)."""


@dataclass(frozen=True)
class Conversation:
    """What the runtime tells an agent about the conversation it answers in."""

    conversation_id: str
    repository: str | None
    selected_branch: str | None
    title: str | None


class Agent:
    """Base class of agents: subclass it, set `name`, implement `run`."""

    name: ClassVar[str] = ""
    # How many of the conversation's newest events `run` needs in `history` (the action is the last
    # of them): None for AGENT_HISTORY_EVENTS. Reading and decoding history costs every run.
    history_events: ClassVar[int | None] = None

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings  # the service's settings (app.config): AGENT_* and the rest

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterable[dict[str, Any]]:
        """Yield the events that answer `action` (the last item of `history`)."""
        raise NotImplementedError


def message_text(action: Mapping[str, Any]) -> str:
    """The text of a user message, in either form (`user_message`'s content, `message`'s args.content)."""
    content = action.get("content")
    if isinstance(content, str):
        return content
    args = action.get("args")
    if isinstance(args, Mapping) and isinstance(args.get("content"), str):
        return args["content"]
    return ""
