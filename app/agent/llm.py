"""The llm agent: answers through any OpenAI-compatible chat-completions server, its reply streamed live."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from .base import Agent, AgentError, Conversation, message_text

SYSTEM_PROMPT = "You are a helpful assistant for software developers. Answer clearly and concisely."
MAX_HISTORY_CHARS = 48_000  # newest turns first: what a small model's context holds
MAX_REPLY_CHARS = 100_000
MAX_LINE_BYTES = 1 << 20  # an SSE line longer than this is no chat-completions stream
MAX_ERROR_BODY_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an error's code ("model_not_found"): no room for a secret
HINTS = {401: "check AGENT_LLM_API_KEY", 403: "check AGENT_LLM_API_KEY",
         404: "check AGENT_LLM_BASE_URL and AGENT_LLM_MODEL"}


def chat_messages(conversation: Conversation, history: list[dict[str, Any]],
                  action: dict[str, Any]) -> list[dict[str, str]]:
    """The system prompt and the conversation's turns (user and assistant), newest within the budget."""
    events = list(history)
    if not events or (events[-1] is not action and events[-1].get("id") != action.get("id")):
        events.append(action)  # the message answered is always the last turn
    turns: list[dict[str, str]] = []
    for event in events:
        kind = event.get("type") or event.get("action")
        if kind == "agent_message" and event.get("source") == "agent" and isinstance(event.get("content"), str):
            # (a user may post an event of type agent_message: it is not the model's own turn)
            turn = {"role": "assistant", "content": event["content"]}
        elif kind in ("user_message", "message"):
            # OpenHands' `message` action is also what its agent says, told apart by source
            turn = {"role": "assistant" if event.get("source") == "agent" else "user", "content": message_text(event)}
        else:
            continue  # actions, observations, state changes: not part of the dialogue
        if turn["content"]:
            turns.append(turn)
    kept: list[dict[str, str]] = []
    budget = MAX_HISTORY_CHARS
    for turn in reversed(turns):
        if kept and len(turn["content"]) > budget:
            break
        kept.append({**turn, "content": turn["content"][-budget:]} if not kept else turn)
        budget -= len(turn["content"])
    system = SYSTEM_PROMPT
    if conversation.repository:
        branch = f" (branch {conversation.selected_branch})" if conversation.selected_branch else ""
        system += f" The conversation is about the repository {conversation.repository}{branch}."
    return [{"role": "system", "content": system}, *reversed(kept)]


def status_error(status: int, body: bytes, key: str) -> AgentError:
    """The error a non-200 answer becomes: its status and, at most, the error's code; never its body."""
    try:
        phrase = f" {HTTPStatus(status).phrase}"
    except ValueError:
        phrase = ""
    code = ""
    try:
        error = json.loads(body).get("error")
        candidate = error.get("code") or error.get("type") if isinstance(error, dict) else None
        if isinstance(candidate, str) and ERROR_CODE.fullmatch(candidate) and not (key and key in candidate):
            code = f" ({candidate})"
    except (ValueError, AttributeError):
        pass
    hint = f": {HINTS[status]}" if status in HINTS else ""
    return AgentError(f"The language model server answered HTTP {status}{phrase}{code}{hint}.")


def parse_event(payload: str) -> tuple[str, bool, bool]:
    """(the reply text in one chat-completion chunk, whether it finished the reply, whether it is [DONE])."""
    if payload.strip() == "[DONE]":
        return "", True, True
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise AgentError("The language model server sent a malformed stream (data that is not JSON).") from None
    if not isinstance(chunk, dict):
        raise AgentError("The language model server sent a malformed stream (a chunk that is not an object).")
    if chunk.get("error") is not None:
        raise AgentError("The language model server reported an error in the middle of its reply.")
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", False, False  # e.g. a usage-only chunk
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else "", bool(choices[0].get("finish_reason")), False


def stream_parts(response: Any) -> Iterator[str]:
    """The reply's text from an SSE stream, one piece per read: bits that arrived together go together."""
    buffer = b""
    data: list[str] = []
    finished = False
    while True:
        chunk = response.read1(READ_SIZE)  # what has arrived, waiting only when nothing has
        lines = (buffer + chunk).split(b"\n") if chunk else [buffer, b"", b""]  # at the end: a last event
        buffer = lines.pop()
        if len(buffer) > MAX_LINE_BYTES:
            raise AgentError("The language model server sent a malformed stream (a line too long).")
        parts: list[str] = []
        for raw in lines:
            try:
                line = raw.rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                raise AgentError("The language model server sent a malformed stream (not UTF-8).") from None
            if line and not line.startswith(":"):
                field, _, value = line.partition(":")
                if field == "data":
                    data.append(value.removeprefix(" "))
                continue
            if not line and data:  # a blank line ends an event
                text, ended, done = parse_event("\n".join(data))
                data = []
                parts.append(text)
                finished = finished or ended
                if done:
                    if "".join(parts):
                        yield "".join(parts)
                    return
        if "".join(parts):
            yield "".join(parts)
        if not chunk:
            if not finished:
                raise AgentError("The language model server's stream ended before the reply was complete.")
            return


def json_reply(response: Any) -> str:
    """The reply of a server that answered in one JSON body although a stream was asked for."""
    try:
        choice = json.loads(response.read(MAX_REPLY_CHARS * 4))["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise AgentError("The language model server sent a malformed answer.") from None
    if not isinstance(content, str):
        raise AgentError("The language model server sent a malformed answer.")
    return content


class LlmAgent(Agent):
    """Sends the conversation to an OpenAI-compatible server and streams its answer."""

    name = "llm"

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield the reply as it arrives (agent_message_delta), then whole (agent_message)."""
        import http.client  # here, not at import time: it imports ssl, which must come after gevent's patching

        base = str(self.settings.get("AGENT_LLM_BASE_URL") or "").strip()
        if not base:
            raise AgentError("The llm agent is not set up: AGENT_LLM_BASE_URL is empty.")
        key = str(self.settings.get("AGENT_LLM_API_KEY") or "")
        timeout = float(self.settings.get("AGENT_LLM_TIMEOUT_SECONDS") or 60)
        parts = urlsplit(base)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise AgentError("AGENT_LLM_BASE_URL must be an http:// or https:// URL.")
        where = f"{parts.hostname}:{port or (443 if parts.scheme == 'https' else 80)}"
        body = json.dumps({"model": str(self.settings.get("AGENT_LLM_MODEL") or ""),
                           "messages": chat_messages(conversation, history, action), "stream": True}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, port, timeout=timeout)
        response = None
        reply = ""
        try:
            try:
                connection.request("POST", parts.path.rstrip("/") + "/chat/completions", body, headers)
                response = connection.getresponse()
            except TimeoutError:
                raise AgentError(f"The language model server at {where} did not answer within {timeout:g} "
                                 "seconds.") from None
            except (OSError, http.client.HTTPException) as err:
                reason = getattr(err, "strerror", None) or type(err).__name__
                raise AgentError(f"Cannot reach the language model server at {where} ({reason}).") from None
            if response.status != 200:
                try:
                    error_body = response.read(MAX_ERROR_BODY_BYTES)
                except (OSError, http.client.HTTPException):
                    error_body = b""
                raise status_error(response.status, error_body, key)
            try:
                if "json" in (response.getheader("Content-Type") or "") and \
                        "event-stream" not in (response.getheader("Content-Type") or ""):
                    reply = json_reply(response)[:MAX_REPLY_CHARS]
                    if reply:
                        yield {"type": "agent_message_delta", "text": reply}
                else:
                    for text in stream_parts(response):
                        text = text[:MAX_REPLY_CHARS - len(reply)]
                        reply += text
                        yield {"type": "agent_message_delta", "text": text}
                        if len(reply) >= MAX_REPLY_CHARS:
                            reply += f"\n\n[reply cut at {MAX_REPLY_CHARS} characters]"
                            break
            except TimeoutError:
                raise AgentError(f"The language model server stopped sending for {timeout:g} seconds in the "
                                 "middle of its reply.") from None
            except (OSError, http.client.HTTPException):
                raise AgentError("The connection to the language model server broke in the middle of its "
                                 "reply.") from None
        finally:
            # also on cancellation (GreenletExit, gen.close()): the server sees the client go and stops
            if response is not None:
                response.close()
            connection.close()
        if not reply:
            raise AgentError("The language model server sent an empty reply.")
        yield {"type": "agent_message", "content": reply}
