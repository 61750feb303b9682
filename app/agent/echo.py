"""The simplest agents: `echo` answers with what it got; `auto` picks readme or echo per conversation."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .base import Agent, Conversation, message_text


class EchoAgent(Agent):
    """Answers each message with its own text (tests, demos)."""

    name = "echo"
    history_events = 1  # the message alone

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterable[dict[str, Any]]:
        """One agent_message: the user's text."""
        yield {"type": "agent_message", "content": message_text(action)}


class AutoAgent(Agent):
    """The default: the readme agent for a conversation that names a repository, echo for the others."""

    name = "auto"
    history_events = 1  # neither readme nor echo reads the history

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        from .readme import ReadmeAgent  # imported here: echo alone needs none of it
        self.readme = ReadmeAgent(settings)
        self.echo = EchoAgent(settings)

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterable[dict[str, Any]]:
        """What readme or echo yields."""
        agent = self.readme if conversation.repository else self.echo
        return agent.run(conversation, history, action)
