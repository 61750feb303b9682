"""An agent for the runtime's tests (loaded by real workers as `tests.agents:ScriptedAgent`).

What it does is written in the user's message: `steps N D` (N action/observation pairs, D
seconds apart, then a message), `agent-error`, `crash`, `hang`, `bad`, `deltas T1|T2|...`;
anything else is echoed. It appends what happens to the file TEST_AGENT_LOG (start, each step,
cancelled), so a test can see that the agent's own code was interrupted.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from app.agent.base import Agent, AgentError, Conversation, message_text


def note(conversation: Conversation, action: dict[str, Any], what: str) -> None:
    """One line in TEST_AGENT_LOG: conversation, message id, what happened."""
    path = os.environ.get("TEST_AGENT_LOG")
    if path:
        with open(path, "a") as out:
            out.write(f"{conversation.conversation_id} {action.get('id')} {what} {time.monotonic():.3f}\n")


class ScriptedAgent(Agent):
    """Does what the message says (see the module's docstring)."""

    name = "scripted"

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterable[dict[str, Any]]:
        """The events the message asks for."""
        text = message_text(action)
        words = text.split()
        note(conversation, action, "start")
        try:
            if words[:1] == ["steps"]:
                count, delay = int(words[1]), float(words[2])
                for n in range(1, count + 1):
                    yield {"type": "agent_action", "action": "step", "args": {"n": n}}
                    time.sleep(delay)  # gevent's sleep in the worker: the stop button interrupts it
                    note(conversation, action, f"step{n}")
                    yield {"type": "observation", "observation": "step", "content": f"step {n} done"}
                yield {"type": "agent_message", "content": f"did {count} steps"}
            elif text == "agent-error":
                raise AgentError("the repository is on fire")
            elif text == "crash":
                raise RuntimeError("password=hunter2 leaked in a traceback")
            elif text == "hang":
                time.sleep(3600)
            elif text == "bad":
                yield 42
            elif words[:1] == ["deltas"]:
                for bit in text[len("deltas "):].split("|"):
                    yield {"type": "agent_message_delta", "text": bit}
                    time.sleep(0.05)
                yield {"type": "agent_message", "content": text[len("deltas "):].replace("|", "")}
            else:
                yield {"type": "agent_message", "content": text, "history": len(history)}
        except BaseException:
            note(conversation, action, "cancelled")
            raise
        note(conversation, action, "end")
