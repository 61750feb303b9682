"""One conversation's runs in a worker: its queued messages answered in order, each run's events written once.

The agent's generator runs in a greenlet of its own and hands its events over a queue; this
greenlet writes them. A stop, a timeout or a lost lease kills only the agent's greenlet (at its
next blocking call), never a write half sent, so the run always knows which step comes next.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.queue
import orjson

from .. import metrics
from ..validation import ACTION_TYPE
from .base import AgentError, Conversation
from .runs import Claim, ConversationGone, LeaseLost, RunEnded

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

_END = object()
_WAKE = object()
RESERVED = ("id", "timestamp", "source", "cause")
# What each kind of event an agent yields must carry (other kinds: only a valid `type`).
REQUIRED: dict[str, dict[str, type]] = {
    "agent_message": {"content": str},
    "agent_action": {"action": str, "args": dict},
    "observation": {"observation": str, "content": str},
    "error": {"message": str},
    "agent_message_delta": {"text": str},
}
RUNTIME_TYPES = ("agent_state_changed", "user_message")  # written by the runtime or by users only


class Cancelled(Exception):
    """The run must end now: `reason` is stop, lost, gone, timeout or shutdown."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def checked(event: Any, max_bytes: int) -> dict[str, Any]:
    """An event the agent yielded, checked; AgentError (a safe text) if it is not one the runtime can write."""
    if not isinstance(event, dict):
        raise AgentError(f"the agent yielded a {type(event).__name__}, not an event (a dict)")
    kind = event.get("type")
    if not isinstance(kind, str) or not ACTION_TYPE.fullmatch(kind) or kind in RUNTIME_TYPES:
        raise AgentError("the agent yielded an event without a valid type")
    for field, expected in REQUIRED.get(kind, {}).items():
        if not isinstance(event.get(field), expected):
            raise AgentError(f"the agent yielded a {kind} event without a {expected.__name__} '{field}'")
    fields = {k: v for k, v in event.items() if k not in RESERVED}
    try:
        size = len(orjson.dumps(fields))
    except (orjson.JSONEncodeError, TypeError):
        raise AgentError(f"the agent yielded a {kind} event that is not JSON") from None
    if size > max_bytes:
        raise AgentError(f"the agent yielded a {kind} event of {size} bytes (more than MAX_EVENT_BYTES, {max_bytes})")
    return fields


class Run:
    """The runs of one conversation while this worker holds its lease."""

    def __init__(self, worker: Worker, cid: str):
        self.worker = worker
        self.runs = worker.runs
        self.cid = cid
        self.token = ""
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.agent_greenlet: gevent.Greenlet | None = None
        self.cancelled: str | None = None
        self.ended = gevent.event.Event()  # set when this worker stops answering the conversation

    def cancel(self, reason: str) -> None:
        """End the run going (from the heartbeat or the shutdown): its agent is killed, the run ends."""
        if self.cancelled is None or reason in ("lost", "gone"):
            self.cancelled = reason
        if self.agent_greenlet is not None:
            self.agent_greenlet.kill(block=False)
        self.queue.put(_WAKE)

    def answer_queue(self) -> str:
        """Take the lease and answer every queued message; what becomes of the work entry.

        'done': nothing is queued (or the conversation is gone): acknowledge it. 'keep': leave it
        pending, to be looked at again once idle (another worker holds the lease, or took it from
        this one). 'handover': shutting down with the lease let go: re-queue it at once.
        """
        token = secrets.token_hex(8)
        claim = self.runs.acquire(self.cid, token)
        if claim == "busy":
            # A live worker answers what is queued before it lets go, or a dead one's lease has not
            # run out yet: either way this entry is looked at again once idle, never dropped.
            return "keep"
        if not isinstance(claim, Claim):
            return "done"  # gone, idle or paused (the next message posted brings its own entry)
        self.token = token
        try:
            while isinstance(claim, Claim):
                more = self._run(claim)
                if self.cancelled == "shutdown":
                    return self._let_go()
                if not more:
                    break
                if self.worker.stopping.is_set():  # warm shutdown: the next message is another worker's
                    return self._let_go()
                claim = self.runs.acquire(self.cid, token)
            if claim == "busy":  # this worker stalled past its lease between two runs: another has it
                return "keep"
        except ConversationGone:
            return "done"
        except (LeaseLost, RunEnded) as err:
            # Another worker holds the conversation now and answers it: its entry is theirs to end.
            log.info("agent: conversation %s: %s", self.cid, type(err).__name__)
            return "keep"
        return "done"

    def _let_go(self) -> str:
        """Give the lease up (shutting down): 'handover' if it is let go, else 'keep' (it runs out)."""
        try:
            self.runs.release(self.cid, self.token)
            return "handover"
        except Exception:  # noqa: BLE001 - the lease runs out by itself; the entry is claimed then
            log.warning("agent: could not release the lease of %s", self.cid)
            return "keep"

    # One run -------------------------------------------------------------------------------

    def _run(self, claim: Claim) -> bool:
        """Answer message `claim.cause`; whether more is queued (counted with its outcome and duration)."""
        started = time.monotonic()
        outcome = "failed"  # a Redis error, a lost lease: it is answered again later
        try:
            more, outcome = self._answer_one(claim)
            return more
        finally:
            agent = self.worker.agent
            metrics.agent_action(agent.name or type(agent).__name__, outcome, time.monotonic() - started)

    def _answer_one(self, claim: Claim) -> tuple[bool, str]:
        """Answer message `claim.cause`; whether more is queued, and the state the run ended in."""
        cause = claim.cause
        self.step = 0  # steps already written (claim.steps_written) are sent again and skipped by the script
        self.replaying = claim.steps_written
        if self.cancelled != "shutdown":
            self.cancelled = "stop" if claim.stop else None
        action = claim.history[-1] if claim.history and claim.history[-1].get("id") == cause else \
            {"id": cause, "type": "user_message", "content": ""}  # trimmed by retention: answered anyway
        self._write(cause, {"type": "agent_state_changed", "agent_state": "running"}, state="running")
        state = "awaiting_user_input"
        if self.cancelled is None:
            state = self._agent_events(claim, cause, action)
        if self.cancelled == "shutdown":
            return False, "shutdown"
        if self.cancelled == "stop" and state != "error":  # a stop that came while the error was written
            state = "stopped"
        elif self.cancelled in ("lost", "gone"):
            raise LeaseLost() if self.cancelled == "lost" else ConversationGone()
        more, written = self.runs.finish(self.cid, self.token, cause, self.step + 1, state)
        log.info("agent: conversation %s, message %d answered (%s)", self.cid, cause, written)
        return more, state

    def _write(self, cause: int, fields: dict[str, Any], *, source: str = "agent", state: str = "",
               ends_reply: bool = False) -> int:
        self.step += 1
        event_id, _before = self.runs.emit(self.cid, self.token, cause, self.step, fields, source=source,
                                           state=state, ends_reply=ends_reply)
        return event_id

    def _agent_events(self, claim: Claim, cause: int, action: dict[str, Any]) -> str:
        """Write what the agent yields until it ends; the state the run ends in."""
        conversation = Conversation(self.cid, claim.repository, claim.selected_branch, claim.title)
        self.queue = gevent.queue.Queue()
        self.agent_greenlet = gevent.spawn(self._produce, conversation, claim.history, action, self.queue)
        max_bytes = self.worker.config["MAX_EVENT_BYTES"]
        last_action: int | None = None
        reply_chars = reply_bytes = 0
        try:
            while True:
                item = self.queue.get(timeout=self.worker.step_timeout) if self.cancelled is None else _WAKE
                if self.cancelled is not None:
                    return "stopped"
                if item is _WAKE:
                    continue
                if item is _END:
                    return "awaiting_user_input"
                if isinstance(item, BaseException):
                    message = str(item) if isinstance(item, AgentError) else \
                        "the agent failed unexpectedly; the worker's log has the details"
                    self._write(cause, {"type": "error", "message": message[:2000]})
                    return "error"
                try:
                    fields = checked(item, max_bytes)
                except AgentError as err:
                    self.agent_greenlet.kill(block=False)
                    self._write(cause, {"type": "error", "message": str(err)})
                    return "error"
                kind = fields["type"]
                if kind == "agent_message_delta":
                    text = fields["text"]
                    if self.step < self.replaying:
                        continue  # a run taken over: the reply these bits make up is stored already
                    self.runs.delta(self.cid, self.token, cause, reply_chars, reply_bytes, text)
                    reply_chars += len(text)
                    reply_bytes += len(text.encode())
                    continue
                if kind == "observation" and "action_id" not in fields and last_action is not None:
                    fields["action_id"] = last_action
                source = "environment" if kind == "observation" else "agent"
                event_id = self._write(cause, fields, source=source, ends_reply=kind == "agent_message")
                if kind == "agent_message":
                    reply_chars = reply_bytes = 0
                if kind == "agent_action":
                    last_action = event_id
        except gevent.queue.Empty:
            self.agent_greenlet.kill(block=False)
            self._write(cause, {"type": "error", "message":
                                f"the agent took longer than {self.worker.step_timeout:g} s for one step"})
            return "error"
        finally:
            if self.agent_greenlet is not None:
                self.agent_greenlet.kill(block=True, timeout=1)
                self.agent_greenlet = None

    def _produce(self, conversation: Conversation, history: list[dict[str, Any]], action: dict[str, Any],
                 out: gevent.queue.Queue) -> None:
        """The agent's greenlet: its events onto the queue, then the end (or what it raised)."""
        try:
            for event in self.worker.agent.run(conversation, history, action) or ():
                out.put(event)
                # An agent that never blocks still lets the worker breathe (heartbeat, stop) at each event.
                gevent.sleep(0)
            out.put(_END)
        except gevent.GreenletExit:
            raise
        except AgentError as err:
            out.put(err)
        except Exception as err:  # noqa: BLE001 - any failure of the agent's code is its run's error
            log.exception("agent %s failed in conversation %s", type(self.worker.agent).__name__, self.cid)
            out.put(err)
